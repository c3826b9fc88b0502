// TP.js's own tests (node --test; clients/web's Go test runs them): the
// parts that need no browser, against fakes of WebTransport's streams.
// The browser runs the rest against a real tpd (internal/tests/e2e,
// TestBrowser*).
import { test } from "node:test";
import assert from "node:assert/strict";
import * as TP from "./tp.js";

const enc = new TextEncoder();

function frame(obj) {
  const b = enc.encode(JSON.stringify(obj));
  return new Uint8Array([b.length >> 8, b.length & 255, ...b]);
}

// A bidirectional stream whose server side answers with the chunks given
// and records what the client wrote.
function fakeStream(chunks) {
  const written = [];
  return {
    written,
    readable: new ReadableStream({ start(c) { for (const x of chunks) c.enqueue(x); c.close(); } }),
    writable: new WritableStream({ write(x) { written.push(x); } }),
  };
}

function fakeTransport(streams, closeInfo) {
  let closeIt;
  return {
    ready: Promise.resolve(),
    closed: closeInfo ? Promise.resolve(closeInfo) : new Promise((ok) => { closeIt = ok; }),
    createBidirectionalStream: async () => streams.shift(),
    close() { closeIt && closeIt({ closeCode: 0, reason: "" }); },
  };
}

test("base64url round trip", () => {
  const b = new Uint8Array([0, 1, 2, 250, 251, 252, 253, 254, 255]);
  assert.equal(TP.b64url(b), "AAEC-vv8_f7_");
  assert.deepEqual(TP.unb64(TP.b64url(b)), b);
  assert.deepEqual(TP.unb64("AAEC+vv8/f7/"), b);
});

test("the grant code is the server's", async () => {
  const spki = TP.unb64(process.env.TP_TEST_SPKI);
  assert.equal(await TP.grantCode(spki), process.env.TP_TEST_CODE);
});

test("a session URL carries the chain, the time and a proof of the key", async () => {
  const pair = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true, ["sign", "verify"]);
  const leaf = enc.encode("a leaf certificate's DER");
  const u = new URL(await TP.sessionURL("https://tp.example.com:8443", { chain: [leaf, enc.encode("intermediate")], key: pair.privateKey }));
  assert.equal(u.pathname, TP.PATH);
  assert.deepEqual(u.searchParams.getAll("cert").map(TP.unb64), [leaf, enc.encode("intermediate")]);
  const time = u.searchParams.get("time");
  assert.ok(Math.abs(Number(time) - Date.now() / 1000) < 5);
  const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", leaf));
  const msg = new Uint8Array([...enc.encode("tp webtransport v1\0tp.example.com:8443\0" + time + "\0"), ...hash]);
  const proof = TP.unb64(u.searchParams.get("proof"));
  assert.equal(proof.length, 64);
  assert.ok(await crypto.subtle.verify({ name: "ECDSA", hash: "SHA-256" }, pair.publicKey, proof, msg));
});

test("a dial sends its hello and hands over the bytes after the server's", async () => {
  const ok = frame({ v: 1, ok: true, session: "0123456789abcdef0123456789abcdef" });
  // The hello split across chunks, and the first bytes of the connection in its last one.
  const st = fakeStream([ok.subarray(0, 1), new Uint8Array([...ok.subarray(1), ...enc.encode("SSH-2.0-")]), enc.encode("OpenSSH")]);
  const s = new TP.Session(fakeTransport([st]), new Promise(() => {}));
  const c = await s.dial("db.internal:5432");
  assert.equal(c.id, "0123456789abcdef0123456789abcdef");
  const hello = st.written[0];
  assert.equal((hello[0] << 8) | hello[1], hello.length - 2);
  assert.deepEqual(JSON.parse(new TextDecoder().decode(hello.subarray(2))), { v: 1, op: "dial", net: "tcp", host: "db.internal", port: 5432 });
  let got = "";
  for await (const x of c.readable) got += new TextDecoder().decode(x);
  assert.equal(got, "SSH-2.0-OpenSSH");
});

test("a refusal rejects with the server's code and reason", async () => {
  const st = fakeStream([frame({ v: 1, ok: false, code: "policy_denied", reason: "alice may not reach db" })]);
  const s = new TP.Session(fakeTransport([st]), new Promise(() => {}));
  await assert.rejects(s.dial("[::1]:22"), (e) => e instanceof TP.TPError && e.code === "policy_denied" && e.reason === "alice may not reach db");
  assert.deepEqual(JSON.parse(new TextDecoder().decode(st.written[0].subarray(2))).host, "::1");
});

test("bad input: no dial of what is not host:port, no hello of another version or size", async () => {
  const s = new TP.Session(fakeTransport([
    fakeStream([frame({ v: 2, ok: true })]),
    fakeStream([new Uint8Array([0x7f, 0xff])]),
    fakeStream([new Uint8Array([0, 9, 1])]),
    fakeStream([new Uint8Array([0, 0])]),
    fakeStream([new Uint8Array([0, 3, 0x7b, 0x7b, 0x7b])]),
  ]), new Promise(() => {}));
  for (const bad of ["db.internal", "db.internal:0", "db.internal:65536", ":22", "db:ssh"]) {
    await assert.rejects(s.dial(bad), (e) => e.code === "bad_request", bad);
  }
  await assert.rejects(s.dial("a:1"), (e) => e.code === "unsupported_version");
  await assert.rejects(s.dial("a:1"), (e) => e.code === "bad_request" && /32767 bytes/.test(e.reason));
  await assert.rejects(s.dial("a:1"), (e) => e.code === "internal" && /before its hello/.test(e.reason));
  await assert.rejects(s.dial("a:1"), (e) => e.code === "bad_request" && /of 0 bytes/.test(e.reason));
  await assert.rejects(s.dial("a:1"), (e) => e.code === "bad_request" && /not JSON/.test(e.reason));
});

test("a refused session says why, as the server's hello put it", async () => {
  globalThis.WebTransport = function () {
    return fakeTransport([], { closeCode: TP.REFUSED, reason: JSON.stringify({ v: 1, ok: false, code: "unauthenticated", reason: "this proof was used before" }) });
  };
  try {
    const pair = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, ["sign"]);
    const s = await TP.connect("https://tp.example.com", { chain: [enc.encode("leaf")], key: pair.privateKey });
    const why = await s.closed;
    assert.equal(why.code, "unauthenticated");
    assert.equal(why.reason, "this proof was used before");
  } finally {
    delete globalThis.WebTransport;
  }
});

test("a cut session names its code", async () => {
  globalThis.WebTransport = function () { return fakeTransport([], { closeCode: 5, reason: "the TP server ended the session: alice@grant-x was revoked" }); };
  try {
    const pair = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, ["sign"]);
    const s = await TP.connect("https://tp.example.com", { chain: [enc.encode("leaf")], key: pair.privateKey });
    const why = await s.closed;
    assert.equal(why.code, "revoked");
    assert.match(why.reason, /was revoked/);
  } finally {
    delete globalThis.WebTransport;
  }
});

test("a page without WebTransport is told so", async () => {
  await assert.rejects(TP.connect("https://tp.example.com", { chain: [], key: null }), (e) => e.code === "unsupported");
});

test("a UDP flow sends and reads datagrams as capsules, and skips what it does not know", async () => {
  const ok = frame({ v: 1, ok: true });
  const report = enc.encode(JSON.stringify({ v: 1, queue_full: 2 }));
  const st = fakeStream([new Uint8Array([...ok, 0, 0, 2, 104]), new Uint8Array([105, 9, 0, 1, 7, 1, 0, report.length, ...report, 0, 0, 0])]);
  const s = new TP.Session(fakeTransport([st]), new Promise(() => {}));
  const f = await s.dialUDP("127.0.0.1:53");
  let reported = null;
  f.onReport = (r) => { reported = r; };
  await f.send(enc.encode("q"));
  assert.equal(JSON.parse(new TextDecoder().decode(st.written[0].subarray(2))).net, "udp");
  assert.deepEqual(st.written[1], new Uint8Array([0, 0, 1, 113]));
  const got = [];
  for await (const d of f.readable) got.push(new TextDecoder().decode(d));
  assert.deepEqual(got, ["hi", ""]);
  assert.deepEqual(reported, { v: 1, queue_full: 2 });
  await assert.rejects(f.send(new Uint8Array(65536)), (e) => e.code === "bad_request");
});

test("a UDP flow over WebTransport sends datagrams with its flow id, takes them back by it, and too large ones as capsules", async () => {
  const ok = frame({ v: 1, ok: true, flow: 300 });
  const written = [];
  const st = { // the flow's stream, open until the end of the test
    written,
    readable: new ReadableStream({ start(c) { c.enqueue(ok); } }),
    writable: new WritableStream({ write(x) { written.push(x); } }),
  };
  let dgIn;
  const sent = [];
  const wt = fakeTransport([st]);
  wt.datagrams = {
    maxDatagramSize: 1200,
    readable: new ReadableStream({ start(c) { dgIn = c; } }),
    writable: new WritableStream({ write(x) { sent.push(x); } }),
  };
  const s = new TP.Session(wt, new Promise(() => {}));
  const f = await s.dialUDP("127.0.0.1:53");
  await f.send(enc.encode("q"));
  assert.deepEqual(sent[0], new Uint8Array([0x41, 0x2c, 113])); // 300 as a varint, then "q"
  await f.send(new Uint8Array(1500)); // too large for a datagram: a capsule on the stream
  assert.equal(st.written[1].length, 1503);
  dgIn.enqueue(new Uint8Array([0x41, 0x2c, 104, 105])); // for this flow
  dgIn.enqueue(new Uint8Array([0x41, 0x2d, 120])); // for no flow: dropped
  const r = f.readable.getReader();
  assert.equal(new TextDecoder().decode((await r.read()).value), "hi");
});

test("without WebTransport, a session uses a WebSocket per request, with the credential's proof", async () => {
  const opened = [];
  globalThis.WebSocket = class {
    static OPEN = 1;
    constructor(url) { opened.push(new URL(url)); this.readyState = 1; setTimeout(() => this.onopen && this.onopen(), 0); }
    send() {}
    close() {}
  };
  try {
    const pair = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, ["sign"]);
    const s = await TP.connect("https://tp.example.com:8443", { chain: [enc.encode("leaf")], key: pair.privateKey });
    assert.equal(s.datagrams(), null);
    const st = await s.open();
    assert.ok(st.readable && st.writable);
    assert.equal(opened[0].protocol, "wss:");
    assert.equal(opened[0].host, "tp.example.com:8443");
    assert.equal(opened[0].pathname, "/tp/v1/websocket");
    assert.ok(opened[0].searchParams.get("proof") && opened[0].searchParams.get("cert"));
  } finally {
    delete globalThis.WebSocket;
  }
});
