// TP.js: TP in the browser. A page opens a WebTransport session to a TP
// server with a device certificate and its key (docs/PROTOCOL.md, section
// 14) and dials through it as `tp` does: each dial is a stream of the
// session that carries TP's hellos, then the connection's bytes.
//
//   import * as TP from "/tp/web/tp.js";
//   const session = await TP.connect("https://tp.example.com", credential);
//   const conn = await session.dial("db.internal:5432");
//   conn.writable … conn.readable …
//
// No dependencies; ES2020 and the WebTransport and WebCrypto APIs.

/** Protocol version of the hellos. */
export const VERSION = 1;

/** Where a server opens sessions (PROTOCOL.md 14.1). */
export const PATH = "/tp/v1/webtransport";

/** The session close code of a refused session; its reason is a server hello. */
export const REFUSED = 0x10;

/** The names of the abort codes (PROTOCOL.md 9.4), by number. */
export const ABORTS = Object.freeze({
  0: "no_error", 1: "internal", 2: "refused", 3: "shutdown", 4: "cert_expired",
  5: "revoked", 6: "policy_changed", 7: "peer_reset",
});

const MAX_HELLO = 16384;
const enc = new TextEncoder();
const dec = new TextDecoder();

/**
 * A refusal or a cut, as `tp` reports it: `code` is the server's code
 * (PROTOCOL.md 5, or an abort's name of 9.4), `reason` a sentence for a
 * person, `by` who cut a session (server, destination, agent, client) when
 * known.
 */
export class TPError extends Error {
  /** @param {string} code @param {string} reason @param {string=} by */
  constructor(code, reason, by) {
    super(reason ? `${code}: ${reason}` : code);
    this.name = "TPError";
    /** @type {string} */ this.code = code;
    /** @type {string} */ this.reason = reason || "";
    /** @type {string|undefined} */ this.by = by;
  }
}

/**
 * A device certificate chain (DER, leaf first) and the private key of its
 * leaf, a non-extractable WebCrypto ECDSA P-256 key.
 * @typedef {{chain: Uint8Array[], key: CryptoKey}} Credential
 */

/** base64url without padding. @param {Uint8Array} b */
export function b64url(b) {
  let s = "";
  for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** Decodes base64 or base64url. @param {string} s */
export function unb64(s) {
  const t = atob(s.replace(/-/g, "+").replace(/_/g, "/").replace(/\s+/g, ""));
  const b = new Uint8Array(t.length);
  for (let i = 0; i < t.length; i++) b[i] = t.charCodeAt(i);
  return b;
}

/** @param {...(Uint8Array|number[])} parts */
function concat(...parts) {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

/**
 * The session URL for server (its base URL) with the credential's proof
 * (PROTOCOL.md 14.1), signed now.
 * @param {string} server @param {Credential} cred
 */
export async function sessionURL(server, cred) {
  const u = new URL(PATH, server);
  const unix = String(Math.floor(Date.now() / 1000));
  const leafHash = new Uint8Array(await crypto.subtle.digest("SHA-256", cred.chain[0]));
  const msg = concat(enc.encode("tp webtransport v1\0"), enc.encode(u.host.toLowerCase()), [0], enc.encode(unix), [0], leafHash);
  const proof = new Uint8Array(await crypto.subtle.sign({ name: "ECDSA", hash: "SHA-256" }, cred.key, msg));
  for (const der of cred.chain) u.searchParams.append("cert", b64url(der));
  u.searchParams.set("time", unix);
  u.searchParams.set("proof", b64url(proof));
  return u.toString();
}

/**
 * Opens a session to server with cred: over WebTransport, or where the
 * browser lacks it (or options.transport is "websocket"), over WebSockets,
 * one per request (PROTOCOL.md 14.4). It rejects with a TPError when the
 * server cannot be reached.
 * @param {string} server the server's base URL, https://HOST[:PORT]
 * @param {Credential} cred
 * @param {(WebTransportOptions & {transport?: "webtransport"|"websocket"})=} options
 *   the rest is passed to WebTransport (e.g. serverCertificateHashes)
 * @returns {Promise<Session>}
 */
export async function connect(server, cred, options = {}) {
  const { transport, ...wtOptions } = options;
  if (transport === "websocket" || (typeof WebTransport === "undefined" && transport !== "webtransport")) {
    if (typeof WebSocket === "undefined") {
      throw new TPError("unsupported", "this browser has neither WebTransport nor WebSocket");
    }
    return new WSSession(server, cred);
  }
  if (typeof WebTransport === "undefined") {
    throw new TPError("unsupported", "this browser has no WebTransport; use Chromium, Chrome, Edge or Firefox, or transport websocket");
  }
  const wt = new WebTransport(await sessionURL(server, cred), wtOptions);
  const closed = wt.closed.then(closeInfo, closeInfo);
  try {
    await wt.ready;
  } catch (e) {
    if (!transport && typeof WebSocket !== "undefined") {
      // UDP blocked on the way, say: the same requests over WebSockets (TCP).
      return new WSSession(server, cred);
    }
    throw new TPError("unreachable", `cannot open a WebTransport session to ${server} (${e && e.message || e}): UDP may be blocked on the way (try transport websocket), or the server does not serve browsers (tpd key webtransport)`);
  }
  return new Session(wt, closed);
}

/** The why of a session's close. @returns {TPError} */
function closeInfo(info) {
  const code = info && typeof info.closeCode === "number" ? info.closeCode : 0;
  const reason = info && info.reason || (info && info.message) || "";
  if (code === REFUSED) {
    try {
      const h = JSON.parse(reason);
      return new TPError(h.code || "refused", h.reason || "");
    } catch (_) {
      return new TPError("refused", reason);
    }
  }
  if (code === 0 && !reason) return new TPError("closed", "the session was closed");
  return new TPError(ABORTS[code] || "closed", reason, "server");
}

/** A session: dials through one WebTransport session. */
export class Session {
  /** @param {WebTransport} wt @param {Promise<TPError>} closed */
  constructor(wt, closed) {
    /** @private */ this.wt = wt;
    /**
     * Resolves, never rejects, when the session ends, with why: a refusal
     * of the credential (its code and reason), the server's cut (revoked,
     * cert_expired, shutdown, with its sentence), or "closed".
     * @type {Promise<TPError>}
     */
    this.closed = closed;
  }

  /**
   * Opens a TCP connection to "host:port" through the server, as `tp host
   * port` does. Rejects with a TPError carrying the server's code and
   * reason when it refuses.
   * @param {string} hostport
   * @returns {Promise<Conn>}
   */
  async dial(hostport) {
    const [host, port] = hostPort(hostport);
    return this.request({ v: VERSION, op: "dial", net: "tcp", host, port });
  }

  /**
   * Opens a UDP flow to "host:port" through the server, as `tp forward
   * --udp` does: its datagrams travel as capsules on the session's stream
   * (PROTOCOL.md 12.2, 14.2). Rejects as dial does.
   * @param {string} hostport
   * @returns {Promise<Flow>}
   */
  async dialUDP(hostport) {
    const [host, port] = hostPort(hostport);
    return new Flow(await this.request({ v: VERSION, op: "dial", net: "udp", host, port }), this);
  }

  /**
   * Asks how the session with this id was cut (PROTOCOL.md 6.2).
   * @param {string} id
   * @returns {Promise<TPError>}
   */
  async why(id) {
    const c = await this.request({ v: VERSION, op: "why", session: id }, true);
    const e = c.hello.end || {};
    return new TPError(e.code || "unknown", e.reason || "", e.by);
  }

  /** @private */
  async request(hello, done) {
    let bidi;
    try {
      bidi = await this.open();
    } catch (e) {
      if (e instanceof TPError) throw e;
      throw await this.closedOr(e);
    }
    const body = enc.encode(JSON.stringify(hello));
    const w = bidi.writable.getWriter();
    const r = bidi.readable.getReader();
    try {
      await w.write(concat([body.length >> 8, body.length & 0xff], body));
      const [sh, rest] = await readFrame(r);
      if (!sh.ok) throw new TPError(sh.code || "refused", sh.reason || "");
      if (done) { w.releaseLock(); r.releaseLock(); return new Conn(this, bidi.readable, bidi.writable, sh); }
      w.releaseLock();
      r.releaseLock();
      return new Conn(this, prepend(rest, bidi.readable), bidi.writable, sh);
    } catch (e) {
      if (e instanceof TPError) throw e;
      throw await this.closedOr(e);
    }
  }

  /** @protected A bidirectional stream for one request. */
  open() { return this.wt.createBidirectionalStream(); }

  /** @protected The session's datagrams (WebTransport's), null without them. */
  datagrams() { return this.wt && this.wt.datagrams || null; }

  /** @protected Sends one of the session's datagrams. */
  async sendDatagram(b) {
    if (!this.dgWriter) this.dgWriter = this.wt.datagrams.writable.getWriter();
    await this.dgWriter.write(b);
  }

  /** @protected Routes the session's datagrams of flow id to flow. */
  addFlow(id, flow) {
    if (!this.flows) {
      this.flows = new Map();
      const r = this.wt.datagrams.readable.getReader();
      (async () => {
        for (;;) {
          let v;
          try { v = await r.read(); } catch (_) { return; }
          if (v.done) return;
          const id = unvarint(v.value);
          const f = id && this.flows.get(id[0]);
          if (f) f.deliver(v.value.slice(id[1]));
          // else: a datagram for no live flow, dropped as the server does
        }
      })();
    }
    this.flows.set(id, flow);
  }

  /** @protected */
  removeFlow(id, flow) {
    if (this.flows && this.flows.get(id) === flow) this.flows.delete(id);
  }

  /** @private The session's why, if it ended; else e as a TPError. */
  async closedOr(e) {
    const ended = await Promise.race([this.closed, new Promise((ok) => setTimeout(ok, 50))]);
    if (ended) return ended;
    return new TPError(abortName(e), e && e.message || String(e));
  }

  /** Ends the session and every connection on it. */
  close() { this.wt.close(); }
}

/**
 * A session over WebSockets (PROTOCOL.md 14.4): each request is a WebSocket
 * of its own with a fresh proof; binary messages carry the bytes, an empty
 * one ends a direction, a close with 4000+c aborts with code c.
 */
class WSSession extends Session {
  /** @protected WebSockets carry no datagrams: flows use capsules. */
  datagrams() { return null; }

  constructor(server, cred) {
    let end;
    super(null, new Promise((ok) => { end = ok; }));
    /** @private */ this.server = server;
    /** @private */ this.cred = cred;
    /** @private */ this.end = end;
    /** @private */ this.sockets = new Set();
  }

  /** @protected */
  async open() {
    const u = new URL(await sessionURL(this.server, this.cred));
    u.protocol = u.protocol === "http:" ? "ws:" : "wss:";
    u.pathname = "/tp/v1/websocket";
    const ws = new WebSocket(u.toString());
    ws.binaryType = "arraybuffer";
    this.sockets.add(ws);
    await new Promise((ok, fail) => {
      ws.onopen = ok;
      ws.onerror = () => fail(new TPError("unreachable", `cannot open a WebSocket to ${this.server}: it is unreachable, or it does not serve browsers (tpd key webtransport)`));
    });
    let rc;
    const readable = new ReadableStream({
      start(c) { rc = c; },
      cancel() { ws.close(); },
    }, { highWaterMark: 64 });
    let fin = false; // the server ended its direction (an empty message)
    ws.onmessage = (ev) => {
      const b = new Uint8Array(ev.data);
      if (b.length === 0) { fin = true; try { rc.close(); } catch (_) { /* closed already */ } } else rc.enqueue(b);
    };
    ws.onclose = (ev) => {
      this.sockets.delete(ws);
      if (ev.code >= 4000 && ev.code < 5000) {
        const e = new TPError(ABORTS[ev.code - 4000] || "internal", ev.reason, "server");
        try { rc.error(e); } catch (_) { /* ended already */ }
        if (ev.code - 4000 >= 3 && ev.code - 4000 <= 5) this.end(e); // shutdown, cert_expired, revoked end them all
      } else if (!fin) {
        // A close before the end of the stream is a cut, never an end.
        try { rc.error(new TPError("peer_reset", `the connection was cut (the WebSocket closed with ${ev.code} before its end)`)); } catch (_) { /* ended already */ }
      }
    };
    const writable = new WritableStream({
      async write(chunk) {
        if (ws.readyState !== WebSocket.OPEN) throw new TPError("internal", "the connection was cut");
        for (let o = 0; o < chunk.length; o += 65536) ws.send(chunk.subarray(o, o + 65536));
        while (ws.bufferedAmount > 1 << 20 && ws.readyState === WebSocket.OPEN) await new Promise((ok) => setTimeout(ok, 5));
      },
      close() {
        if (ws.readyState !== WebSocket.OPEN) throw new TPError("internal", "the connection was cut before its end");
        ws.send(new Uint8Array(0));
      },
      abort() { ws.close(); },
    });
    return { readable, writable };
  }

  close() {
    for (const ws of this.sockets) ws.close();
    this.end(new TPError("closed", "the session was closed"));
  }
}

/** A connection through TP: WHATWG streams of bytes. */
export class Conn {
  constructor(session, readable, writable, hello) {
    /** @private */ this.session = session;
    /** @type {ReadableStream<Uint8Array>} */ this.readable = readable;
    /** @type {WritableStream<Uint8Array>} */ this.writable = writable;
    /** The server's session id, for why. @type {string|undefined} */
    this.id = hello.session;
    /** The server hello. */ this.hello = hello;
  }

  /**
   * How this connection was cut, when a read or write failed: the server's
   * record (PROTOCOL.md 6.2) or the session's close.
   * @returns {Promise<TPError>}
   */
  async why() {
    if (!this.id) return new TPError("unknown_session", "this connection has no session id");
    try {
      return await this.session.why(this.id);
    } catch (e) {
      return e instanceof TPError ? e : new TPError("internal", String(e));
    }
  }
}

/** host:port split and checked. */
function hostPort(hostport) {
  const m = /^\[?([^\]]*)\]?:(\d{1,5})$/.exec(hostport);
  if (!m || !m[1] || +m[2] < 1 || +m[2] > 65535) {
    throw new TPError("bad_request", `"${hostport}" is not host:port`);
  }
  return [m[1], +m[2]];
}

/** The largest datagram a flow carries (PROTOCOL.md 12.2). */
export const MAX_DATAGRAM = 65535;

/** A QUIC variable-length integer (RFC 9000 16) of n < 2^53. */
function varint(n) {
  if (n < 64) return [n];
  if (n < 16384) return [0x40 | (n >> 8), n & 255];
  if (n < 1073741824) return [0x80 | (n >>> 24), (n >> 16) & 255, (n >> 8) & 255, n & 255];
  const hi = Math.floor(n / 4294967296), lo = n >>> 0;
  return [0xc0 | (hi >>> 24), (hi >> 16) & 255, (hi >> 8) & 255, hi & 255, lo >>> 24, (lo >> 16) & 255, (lo >> 8) & 255, lo & 255];
}

/** Reads a varint at the start of b: [value, length], or null. */
function unvarint(b) {
  if (!b.length) return null;
  const len = 1 << (b[0] >> 6);
  if (b.length < len) return null;
  let v = b[0] & 0x3f;
  for (let i = 1; i < len; i++) v = v * 256 + b[i];
  return [v, len];
}

/**
 * A UDP flow through TP: send datagrams, read them from readable. Over
 * WebTransport its datagrams are the session's datagrams with the flow id
 * the server named (PROTOCOL.md 14.2), and capsules on the stream when too
 * large for one; over WebSockets, capsules.
 */
export class Flow {
  /** @param {Conn} conn @param {Session} session */
  constructor(conn, session) {
    /** @private */ this.writer = conn.writable.getWriter();
    /** The server hello. */ this.hello = conn.hello;
    /** @type {((report: object) => void) | undefined} */
    this.onReport = undefined;
    /** @private */ this.session = session;
    let ctrl;
    /** @private */ this.pulled = null; // resolves when the page reads again
    const flow = this;
    /**
     * The datagrams from the destination, one Uint8Array each; REPORT
     * capsules (drops the other side counted) go to onReport.
     * @type {ReadableStream<Uint8Array>}
     */
    this.readable = new ReadableStream({
      start(c) { ctrl = c; },
      pull() { if (flow.pulled) { const p = flow.pulled; flow.pulled = null; p(); } },
    }, { highWaterMark: 256 });
    /** @private */ this.ctrl = ctrl;
    /** Datagrams dropped because the page did not read them in time (as UDP drops them). */
    this.dropped = 0;
    /** @private */ this.prefix = null;
    if (typeof conn.hello.flow === "number" && session.datagrams()) {
      this.prefix = new Uint8Array(varint(conn.hello.flow));
      session.addFlow(conn.hello.flow, this);
    }
    pumpCapsules(conn.readable, this);
  }

  /** @private A datagram from the session's datagrams. */
  deliver(d) {
    try {
      if (this.ctrl.desiredSize > 0) this.ctrl.enqueue(d);
      else this.dropped++; // the page reads slower than datagrams come: dropped, as UDP does, and counted
    } catch (_) { /* the flow ended */ }
  }

  /** @private Waits until the page wants more (capsules are held back, not dropped). */
  room() {
    if (this.ctrl.desiredSize > 0) return null;
    return new Promise((ok) => { this.pulled = ok; });
  }

  /** @private */
  ended(err) {
    if (this.prefix) this.session.removeFlow(this.hello.flow, this);
    try { if (err) this.ctrl.error(err); else this.ctrl.close(); } catch (_) { /* ended already */ }
  }

  /** Sends one datagram. @param {Uint8Array} b */
  async send(b) {
    if (b.length > MAX_DATAGRAM) throw new TPError("bad_request", `a datagram of ${b.length} bytes; a flow carries at most ${MAX_DATAGRAM}`);
    const dg = this.prefix && this.session.datagrams();
    if (dg && this.prefix.length + b.length <= dg.maxDatagramSize) {
      await this.session.sendDatagram(concat(this.prefix, b));
      return;
    }
    await this.writer.write(concat([0, b.length >> 8, b.length & 255], b));
  }

  /** Ends the flow. */
  async close() {
    try { await this.writer.close(); } catch (_) { /* already cut */ }
  }
}

/** Reads the capsules of a flow's stream into flow until the stream ends. */
async function pumpCapsules(readable, flow) {
  const r = readable.getReader();
  let buf = new Uint8Array(0);
  try {
    for (;;) {
      while (buf.length >= 3 && buf.length >= 3 + ((buf[1] << 8) | buf[2])) {
        const n = (buf[1] << 8) | buf[2];
        const typ = buf[0];
        const p = buf.slice(3, 3 + n);
        buf = buf.subarray(3 + n);
        if (typ === 0) {
          const wait = flow.room();
          if (wait) await wait;
          try { flow.ctrl.enqueue(p); } catch (_) { /* the flow ended */ }
        }
        else if (typ === 1 && flow.onReport) { try { flow.onReport(JSON.parse(dec.decode(p))); } catch (_) { /* a report is advice */ } }
        // unknown types are skipped
      }
      const { value, done } = await r.read();
      if (done) {
        flow.ended(buf.length ? new TPError("internal", "the flow ended inside a capsule") : null);
        return;
      }
      buf = concat(buf, value);
    }
  } catch (e) {
    flow.ended(e instanceof TPError ? e : new TPError(abortName(e), e && e.message || String(e)));
  }
}

/** The abort name in a WebTransportError, "internal" when it has none. */
function abortName(e) {
  if (e && typeof e.streamErrorCode === "number") return ABORTS[e.streamErrorCode] || "internal";
  return "internal";
}

/**
 * Reads one frame (a 2-byte length and a JSON body) and returns it parsed
 * with the bytes read past it.
 * @param {ReadableStreamDefaultReader<Uint8Array>} r
 */
async function readFrame(r) {
  let buf = new Uint8Array(0);
  let n = -1;
  while (n < 0 || buf.length < 2 + n) {
    if (n < 0 && buf.length >= 2) {
      n = (buf[0] << 8) | buf[1];
      if (n === 0 || n > MAX_HELLO) throw new TPError("bad_request", `a server hello of ${n} bytes`);
      continue;
    }
    const { value, done } = await r.read();
    if (done) throw new TPError("internal", "the server ended the stream before its hello");
    buf = concat(buf, value);
  }
  let h;
  try {
    h = JSON.parse(dec.decode(buf.subarray(2, 2 + n)));
  } catch (e) {
    throw new TPError("bad_request", "the server's hello is not JSON");
  }
  if (h.v !== VERSION) throw new TPError("unsupported_version", `the server speaks protocol version ${h.v}`);
  return [h, buf.subarray(2 + n)];
}

/** readable with head in front. */
function prepend(head, readable) {
  if (!head.length) return readable;
  const r = readable.getReader();
  let first = head;
  return new ReadableStream({
    async pull(c) {
      if (first) { c.enqueue(first); first = null; return; }
      const { value, done } = await r.read();
      if (done) c.close(); else c.enqueue(value);
    },
    cancel(why) { return r.cancel(why); },
  });
}

/**
 * Imports a PKCS #8 ECDSA P-256 key as a non-extractable signing key (a
 * credential a test or a tool hands over; a browser's own credential is
 * made with newKey and never leaves it).
 * @param {Uint8Array} pkcs8
 */
export function importKey(pkcs8) {
  return crypto.subtle.importKey("pkcs8", pkcs8, { name: "ECDSA", namedCurve: "P-256" }, false, ["sign"]);
}

/** Reads a PEM file's blocks of one type as DER. @param {string} pem @param {string} type */
export function pemBlocks(pem, type) {
  const out = [];
  const re = new RegExp(`-----BEGIN ${type}-----([^-]*)-----END ${type}-----`, "g");
  let m;
  while ((m = re.exec(pem))) out.push(unb64(m[1]));
  return out;
}

// Credentials (docs/LOGIN.md, "Browsers"): the browser makes a key that
// never leaves it (WebCrypto, non-extractable, kept in IndexedDB per
// server), shows a grant link for a person to approve (tp grant LINK on an
// enrolled device, or the link opened and approved by signing in), and then
// gets a device certificate for that key, signed by it, whenever it needs
// a fresh one.

const DB = "tp";
const KEYS = "keys";

function idb(mode, f) {
  return new Promise((ok, fail) => {
    const open = indexedDB.open(DB, 1);
    open.onupgradeneeded = () => open.result.createObjectStore(KEYS);
    open.onerror = () => fail(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction(KEYS, mode);
      const req = f(tx.objectStore(KEYS));
      tx.oncomplete = () => { open.result.close(); ok(req && req.result); };
      tx.onerror = () => { open.result.close(); fail(tx.error); };
    };
  });
}

/** The browser's key pair for server, made (and kept) on first use. */
async function keyFor(server) {
  const origin = new URL(server).origin;
  let pair = await idb("readonly", (s) => s.get(origin));
  if (!pair) {
    pair = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, ["sign"]);
    await idb("readwrite", (s) => s.put(pair, origin));
  }
  return pair;
}

/** Forgets the browser's key for server: the next credential needs a new approval. */
export async function forget(server) {
  const origin = new URL(server).origin;
  await idb("readwrite", (s) => { s.delete("cert:" + origin); return s.delete(origin); });
}

/** base64 (standard) of b. @param {Uint8Array} b */
function b64(b) {
  let s = "";
  for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i]);
  return btoa(s);
}

const B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/** The code both sides show for a key (login.GrantCode). @param {Uint8Array} spki */
export async function grantCode(spki) {
  const sum = new Uint8Array(await crypto.subtle.digest("SHA-256", spki)).subarray(0, 10);
  let bits = 0, n = 0, out = "";
  for (const x of sum) {
    bits = (bits << 8) | x; n += 8;
    while (n >= 5) { out += B32[(bits >> (n - 5)) & 31]; n -= 5; }
  }
  return `${out.slice(0, 4)}-${out.slice(4, 8)}-${out.slice(8, 12)}-${out.slice(12, 16)}`;
}

async function signedAsk(server, path, context, pair) {
  const spki = new Uint8Array(await crypto.subtle.exportKey("spki", pair.publicKey));
  const pub = b64(spki);
  const time = new Date().toISOString().replace(/\.\d+Z$/, "Z");
  const sig = new Uint8Array(await crypto.subtle.sign({ name: "ECDSA", hash: "SHA-256" }, pair.privateKey,
    enc.encode(`${context}\0${pub}\0${time}`)));
  const resp = await fetch(new URL(path, server), {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ public_key: pub, time, signature: b64(sig) }),
  });
  let body = {};
  try { body = await resp.json(); } catch (_) { /* not JSON: the status says it */ }
  return { status: resp.status, body };
}

/**
 * The browser's credential at server: its key and a fresh certificate for
 * it. Without an approval yet, it shows the grant link through onLink
 * (once) and waits until a person approves it or signal aborts.
 * @param {string} server the server's base URL
 * @param {{name?: string, app?: string, onLink?: (link: string, code: string) => void,
 *          signal?: AbortSignal, poll?: number, origin?: string}} opts
 *   name: the reverse name the credential may connect to, or "*" (the
 *   default) for what the policy lets the person connect to. origin: the
 *   web origin it is bound to, the page's own by default ("" for none).
 * @returns {Promise<Credential & {deviceID: string, scope: string, notAfter: Date}>}
 */
export async function credential(server, opts = {}) {
  const pair = await keyFor(server);
  const spki = new Uint8Array(await crypto.subtle.exportKey("spki", pair.publicKey));
  // A certificate in the first half of its life is used again: each new one
  // is a record on the server, which bounds how often a device gets one.
  const origin = new URL(server).origin;
  const kept = await idb("readonly", (s) => s.get("cert:" + origin));
  if (kept && kept.half > Date.now()) {
    return { chain: kept.chain, key: pair.privateKey, deviceID: kept.deviceID, scope: kept.scope, notAfter: new Date(kept.notAfter) };
  }
  let shown = false;
  for (;;) {
    const { status, body } = await signedAsk(server, "/tp/v1/grant/certificate", "tp-grant-certificate-v1", pair);
    if (status === 200) {
      const chain = body.chain.map(unb64);
      const notAfter = new Date(body.not_after);
      const half = Date.now() + (notAfter.getTime() - Date.now()) / 2;
      await idb("readwrite", (s) => s.put({ chain, deviceID: body.device_id, scope: body.scope, notAfter: notAfter.getTime(), half }, "cert:" + origin));
      return { chain, key: pair.privateKey, deviceID: body.device_id, scope: body.scope, notAfter };
    }
    if (status !== 404 || body.code !== "grant_pending") {
      throw new TPError(body.code || `http_${status}`, body.error || `the server answered ${status}`);
    }
    if (!shown) {
      const u = new URL("/grant", server);
      u.searchParams.set("name", opts.name || "*");
      u.searchParams.set("app", opts.app || "a browser");
      u.searchParams.set("dial", "1");
      // Bound to this page's origin: the server then serves the certificate
      // to pages of that origin only, and the person sees which it is.
      const origin = opts.origin !== undefined ? opts.origin : (globalThis.location && location.protocol === "https:" ? location.origin : "");
      if (origin) u.searchParams.set("origin", origin);
      u.searchParams.set("key", b64url(spki));
      if (opts.onLink) opts.onLink(u.toString(), await grantCode(spki));
      shown = true;
    }
    await new Promise((ok, fail) => {
      const t = setTimeout(ok, opts.poll || 2000);
      if (opts.signal) opts.signal.addEventListener("abort", () => { clearTimeout(t); fail(new TPError("aborted", "no one approved the browser")); }, { once: true });
    });
  }
}

// SSH in the browser (ssh.html): sshterm, Go's SSH client compiled to
// WebAssembly (dist/ssh.wasm, built by deploy/build-web.sh), runs SSH over a
// connection of a session; to a protected name, inside TLS with the agent,
// as tp does. The SSH key is a WebCrypto key too: the page signs for it.

/**
 * The browser's SSH key (ECDSA P-256, non-extractable), made and kept on
 * first use: its authorized_keys line, and its SPKI for sshterm.
 * @param {string=} name which of the browser's SSH keys ("ssh")
 * @returns {Promise<{authorizedKey: string, spki: Uint8Array, sign: (m: Uint8Array) => Promise<Uint8Array>}>}
 */
export async function sshKey(name = "ssh") {
  const id = "ssh:" + name;
  let pair = await idb("readonly", (s) => s.get(id));
  if (!pair) {
    pair = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, ["sign"]);
    await idb("readwrite", (s) => s.put(pair, id));
  }
  const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  const str = (b) => concat([b.length >>> 24, (b.length >> 16) & 255, (b.length >> 8) & 255, b.length & 255], b);
  const blob = concat(str(enc.encode("ecdsa-sha2-nistp256")), str(enc.encode("nistp256")), str(raw));
  return {
    authorizedKey: `ecdsa-sha2-nistp256 ${b64(blob)} tp-browser-${name}`,
    spki: new Uint8Array(await crypto.subtle.exportKey("spki", pair.publicKey)),
    sign: signer(pair.privateKey),
  };
}

/** sign(message) → r||s with a WebCrypto ECDSA P-256 key. */
function signer(key) {
  return async (m) => new Uint8Array(await crypto.subtle.sign({ name: "ECDSA", hash: "SHA-256" }, key, m));
}

let sshterm = null;

/** Loads sshterm once, from base (the directory of tp.js). */
export function loadSSH(base = new URL("./", import.meta.url).toString()) {
  if (!sshterm) {
    sshterm = (async () => {
      if (typeof globalThis.Go === "undefined") {
        await new Promise((ok, fail) => {
          const s = document.createElement("script");
          s.src = new URL("dist/wasm_exec.js", base).toString();
          s.onload = ok;
          s.onerror = () => fail(new TPError("unavailable", "the terminal's files are missing on this server (dist/wasm_exec.js): build them with deploy/build-web.sh"));
          document.head.appendChild(s);
        });
      }
      const go = new globalThis.Go();
      const resp = await fetch(new URL("dist/ssh.wasm", base));
      if (!resp.ok) throw new TPError("unavailable", "the terminal's files are missing on this server (dist/ssh.wasm): build them with deploy/build-web.sh");
      const { instance } = await WebAssembly.instantiate(await resp.arrayBuffer(), go.importObject);
      go.run(instance);
      if (typeof globalThis.tpSSH !== "function") throw new TPError("internal", "sshterm did not start");
      return globalThis.tpSSH;
    })();
    sshterm.catch(() => { sshterm = null; });
  }
  return sshterm;
}

/**
 * Whether fingerprint is host's SSH key as this browser knew it: a host
 * seen for the first time is trusted and remembered (as ssh's
 * StrictHostKeyChecking=accept-new does); another key later is refused.
 * @param {string} host @param {string} fingerprint
 */
export async function knownHost(host, fingerprint) {
  const id = "host:" + host;
  const known = await idb("readonly", (s) => s.get(id));
  if (known === undefined) {
    await idb("readwrite", (s) => s.put(fingerprint, id));
    return true;
  }
  if (known !== fingerprint) {
    throw new TPError("host_key_changed", `${host}'s SSH key is ${fingerprint}, not the ${known} this browser knew: someone may be in between; if the host's key changed, TP.forgetHost("${host}")`);
  }
  return true;
}

/** Forgets host's SSH key. @param {string} host */
export async function forgetHost(host) {
  await idb("readwrite", (s) => s.delete("host:" + host));
}

/** TP's root certificate (DER) from server. */
export async function root(server) {
  const resp = await fetch(new URL("/tp/v1/roots", server));
  if (!resp.ok) throw new TPError(`http_${resp.status}`, "the server did not give its root certificate");
  const certs = pemBlocks(await resp.text(), "CERTIFICATE");
  if (!certs.length) throw new TPError("internal", "the server's root certificate cannot be read");
  return certs[certs.length - 1];
}

/**
 * Runs SSH over conn (a Conn of session, to host): a shell, or command,
 * on a terminal of cols × rows. onData gets what it prints, onClose why it
 * ended; onHostKey, when given, gets the server's key's SHA-256
 * fingerprint and returns (a promise of) whether to go on.
 * @returns {Promise<{write: (b: Uint8Array) => void, resize: (cols: number, rows: number) => void, close: () => void}>}
 */
export async function ssh(conn, opts) {
  const run = await loadSSH(opts.base);
  const key = opts.key || await sshKey();
  const host = opts.host || "";
  const o = {
    conn, host, user: opts.user, cols: opts.cols || 80, rows: opts.rows || 24, command: opts.command || "",
    sshPublicKey: key.spki, sshSign: key.sign,
    onData: opts.onData, onClose: opts.onClose, onHostKey: opts.onHostKey || ((fp) => knownHost(host, fp)),
  };
  if (conn.hello.e2e) {
    if (!opts.credential) throw new TPError("bad_request", "the name is protected: ssh needs the credential to run TLS with its agent");
    o.tls = {
      serverName: host.replace(/:\d+$/, "").replace(/^\[|\]$/g, ""),
      root: opts.root || await root(opts.server || location.origin),
      chain: opts.credential.chain,
      sign: signer(opts.credential.key),
    };
  }
  return run(o);
}
