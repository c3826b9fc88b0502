// Types of TP.js (tp.js), TP's client for browsers. docs/CLIENTS.md,
// "TP.js", shows it in use; docs/PROTOCOL.md section 14 is what it speaks.

/** Protocol version of the hellos (1). */
export const VERSION: number;
/** Where a server opens WebTransport sessions: /tp/v1/webtransport. */
export const PATH: string;
/** The close code of a session the server refused (0x10). */
export const REFUSED: number;
/** The names of the abort codes, by number (PROTOCOL.md 9.4). */
export const ABORTS: Readonly<Record<number, string>>;

/** A refusal or a cut, with the server's code and a sentence for a person. */
export class TPError extends Error {
  constructor(code: string, reason: string, by?: string);
  /** The server's code (PROTOCOL.md 5), an abort's name (9.4), or one of TP.js's own: unsupported, unreachable, unavailable, aborted, closed. */
  readonly code: string;
  readonly reason: string;
  /** Who cut a session: server, destination, agent or client; when known. */
  readonly by?: string;
}

/** A device certificate chain (DER, leaf first) and its leaf's private key (WebCrypto, ECDSA P-256). */
export interface Credential {
  chain: Uint8Array[];
  key: CryptoKey;
}

/** A credential from a grant, with what the server said of it. */
export interface GrantedCredential extends Credential {
  deviceID: string;
  scope: string;
  notAfter: Date;
}

export interface CredentialOptions {
  /** The reverse name the credential may connect to, or "*" (the default): what the policy lets the person reach. */
  name?: string;
  /** What the page calls itself, shown to the person who approves. */
  app?: string;
  /** Called once, when no one has approved this browser yet, with the grant link and its code. */
  onLink?: (link: string, code: string) => void;
  signal?: AbortSignal;
  /** Milliseconds between asks while waiting for the approval (2000). */
  poll?: number;
  /** The web origin the credential is bound to: the page's own (https) by default, "" for none. */
  origin?: string;
}

/** The browser's credential at server: its own key (kept in IndexedDB) and a fresh certificate, once a person approved it. */
export function credential(server: string, opts?: CredentialOptions): Promise<GrantedCredential>;
/** Forgets the browser's key for server. */
export function forget(server: string): Promise<void>;
/** The code a person compares before approving (as tp grant shows it). */
export function grantCode(spki: Uint8Array): Promise<string>;

/** Opens a session; rejects with a TPError when WebTransport is missing or the server cannot be reached. */
export function connect(server: string, cred: Credential, options?: WebTransportOptions & { transport?: "webtransport" | "websocket" }): Promise<Session>;
/** The session URL with the credential's proof, signed now. */
export function sessionURL(server: string, cred: Credential): Promise<string>;

export class Session {
  /** Resolves when the session ends, with why (a refusal of the credential, revoked, cert_expired, shutdown, closed). */
  readonly closed: Promise<TPError>;
  /** A TCP connection to "host:port"; rejects with the server's code and reason when refused. */
  dial(hostport: string): Promise<Conn>;
  /** A UDP flow to "host:port": over WebTransport its datagrams are the session's; too large ones, and all over WebSockets, capsules on the stream. */
  dialUDP(hostport: string): Promise<Flow>;
  /** How the session with this id was cut (PROTOCOL.md 6.2). */
  why(id: string): Promise<TPError>;
  close(): void;
}

export interface ServerHello {
  v: number;
  ok: boolean;
  session?: string;
  e2e?: boolean;
  code?: string;
  reason?: string;
}

export class Conn {
  readonly readable: ReadableStream<Uint8Array>;
  readonly writable: WritableStream<Uint8Array>;
  /** The server's session id, for why. */
  readonly id?: string;
  readonly hello: ServerHello;
  /** How the connection was cut, after a read or write failed. */
  why(): Promise<TPError>;
}

/** The largest datagram a flow carries (65535). */
export const MAX_DATAGRAM: number;

export class Flow {
  /** The datagrams from the destination, one chunk each. */
  readonly readable: ReadableStream<Uint8Array>;
  readonly hello: ServerHello;
  /** Gets the other side's REPORT capsules: the datagrams it dropped, cumulative. */
  onReport?: (report: { v: number; too_large?: number; queue_full?: number; largest?: number }) => void;
  /** Datagrams dropped because the page did not read them in time. */
  readonly dropped: number;
  send(datagram: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

export interface SSHKey {
  /** The line for ~/.ssh/authorized_keys. */
  authorizedKey: string;
  spki: Uint8Array;
  sign(message: Uint8Array): Promise<Uint8Array>;
}

/** The browser's SSH key (ECDSA P-256, non-extractable), made and kept on first use. */
export function sshKey(name?: string): Promise<SSHKey>;

export interface SSHOptions {
  user: string;
  /** The destination as dialed (host:port); its host is the TLS name of a protected reverse name. */
  host: string;
  /** Needed for a protected name: the TLS with its agent presents it. */
  credential?: Credential;
  key?: SSHKey;
  cols?: number;
  rows?: number;
  /** A command instead of a shell. */
  command?: string;
  onData?: (bytes: Uint8Array) => void;
  onClose?: (why: string) => void;
  /** Gets the server's host key's SHA-256 fingerprint; returns whether to go on (default: knownHost). */
  onHostKey?: (fingerprint: string) => boolean | Promise<boolean>;
  /** TP's root (DER); fetched from server (or the page's origin) when absent. */
  root?: Uint8Array;
  server?: string;
  /** Where tp.js and dist/ are (the directory of tp.js). */
  base?: string;
}

export interface SSHSession {
  write(bytes: Uint8Array): void;
  resize(cols: number, rows: number): void;
  close(): void;
}

/** Whether fingerprint is host's SSH key as this browser knew it: trusted and kept on first use; rejects (host_key_changed) on another key later. */
export function knownHost(host: string, fingerprint: string): Promise<boolean>;
/** Forgets host's SSH key. */
export function forgetHost(host: string): Promise<void>;

/** Runs SSH over conn in this page (sshterm, WebAssembly). */
export function ssh(conn: Conn, opts: SSHOptions): Promise<SSHSession>;
/** Loads sshterm once. */
export function loadSSH(base?: string): Promise<(options: object) => Promise<SSHSession>>;
/** TP's root certificate (DER) from server. */
export function root(server: string): Promise<Uint8Array>;

export function b64url(b: Uint8Array): string;
export function unb64(s: string): Uint8Array;
/** Imports a PKCS #8 ECDSA P-256 key as a non-extractable signing key. */
export function importKey(pkcs8: Uint8Array): Promise<CryptoKey>;
/** The DER of a PEM file's blocks of one type. */
export function pemBlocks(pem: string, type: string): Uint8Array[];
