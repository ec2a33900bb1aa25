/**
 * Authentication is decided on the route the server matched, never on the raw URL: with a
 * key configured, every spelling of every route (percent-escapes, absolute form, doubled
 * slashes, dot segments, a trailing `?`, HEAD, other cases) gets 401 without the key and
 * creates or lists nothing; with the key each either reaches its route or gets a clear 4xx.
 * With no key, a request for a Host that is not a loopback name (DNS rebinding) is refused.
 * Requests are written by hand on sockets: fetch would normalise the URLs under test.
 */
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { sandboxRows, startTestDaemon, type TestDaemon } from "./harness.js";
import { portOf, type RawReply, rawRequest, requestText } from "./raw-http.js";

const KEY = `pf_test_${process.pid}_auth_routes`;

function contractError(r: RawReply, code: string): void {
  const body = JSON.parse(r.body) as { error?: unknown; code?: unknown };
  assert.equal(body.code, code, r.body);
  assert.equal(typeof body.error, "string");
}

/**
 * [method, target, status with the key]. GET list spellings that reach the list route
 * answer 200; the same spellings with POST reach the create route's schema check (400 for
 * the invalid body sent with the key, so no VM is started); spellings no route matches are
 * 404, and a malformed escape is 400.
 */
const LIST_SPELLINGS: [string, number, number][] = [
  // target, GET status with key, POST status with key (body {"vcpu_count": 0})
  ["/v1/sandboxes", 200, 400],
  ["/%761/sandboxes", 200, 400],
  ["/%76%31/%73andboxes", 200, 400],
  ["/v1/%73andboxes", 200, 400],
  ["http://x/v1/sandboxes", 200, 400],
  ["HTTP://X:1/v1/sandboxes", 200, 400],
  ["/v1/sandboxes?", 200, 400],
  ["/v1/sandboxes?x=1", 200, 400],
  ["/v1/sandboxes#", 200, 400],
  ["//v1/sandboxes", 404, 404],
  ["/v1//sandboxes", 404, 404],
  ["/v1/sandboxes/", 400, 404], // GET /v1/sandboxes/:id with an empty id: the schema says so
  ["/v1/../v1/sandboxes", 404, 404],
  ["/x/../v1/sandboxes", 404, 404],
  ["/v1/./sandboxes", 404, 404],
  ["/v1/%2e%2e/v1/sandboxes", 404, 404],
  ["/V1/sandboxes", 404, 404],
  ["/v1/SANDBOXES", 404, 404],
  ["/v1/sandboxes;x", 404, 404],
  ["/v1/sandboxes%2f", 404, 404],
  ["/v1/%zz", 400, 400],
  ["*", 404, 404],
];

const OTHER_SPELLINGS: [string, string, number][] = [
  ["GET", "/metrics", 200],
  ["GET", "/%6detrics", 200],
  ["GET", "/%6D%65trics", 200],
  ["GET", "http://x/metrics", 200],
  ["GET", "/METRICS", 404],
  ["GET", "/metrics/", 404],
  ["GET", "/v1/capacity", 200],
  ["GET", "/v1/%63apacity", 200],
  ["GET", "/v1/sandboxes/sbx_nope", 404],
  ["GET", "/%761/sandboxes/sbx_nope", 404],
  ["DELETE", "/v1/%73andboxes/sbx_nope", 404],
  ["POST", "/v1/sandboxes/sbx_nope/%65xec", 400], // no body: the schema check answers
  ["POST", "/v1/sandboxes/sbx_nope/fork", 400], // no body: the schema check answers
  ["POST", "/v1/sandboxes/sbx_a/merge_into/sbx_b", 404],
  ["GET", "/v1/sandboxes/sbx_nope/files?path=/etc/passwd", 404],
  ["GET", "/nothing-here", 404],
  ["POST", "/v1/healthz", 404],
];

describe("authentication on the matched route (a key configured)", () => {
  let d: TestDaemon;
  let port: number;
  before(async () => {
    d = await startTestDaemon({ poolSize: 0, apiKeys: [KEY] });
    port = portOf(d.url);
  });
  after(async () => {
    await d?.close();
  });

  const send = (method: string, target: string, key: string | null, body = "") =>
    rawRequest(
      port,
      requestText(method, target, key ? { authorization: `Bearer ${key}` } : {}, body),
    );

  it("refuses every spelling of every route without the key, and creates nothing", async () => {
    const refused: string[] = [];
    const attempts: [string, string, string][] = [];
    for (const [target] of LIST_SPELLINGS) {
      attempts.push(["GET", target, ""], ["HEAD", target, ""], ["POST", target, "{}"]);
    }
    for (const [method, target] of OTHER_SPELLINGS) attempts.push([method, target, ""]);
    for (const key of [null, "wrong-key", `${KEY}x`]) {
      for (const [method, target, body] of attempts) {
        const r = await send(method, target, key, body);
        const what = `${method} ${target} (key ${key})`;
        assert.equal(r.status, 401, `${what}: ${r.raw.slice(0, 300)}`);
        if (method !== "HEAD") contractError(r, "unauthorized");
        assert.ok(!r.body.includes('sandboxes"'), `${what} leaked a list: ${r.body}`);
        assert.ok(!r.body.includes("podflare_"), `${what} leaked metrics`);
        refused.push(what);
      }
    }
    assert.equal(sandboxRows(d), 0, "no create reached the service");
    assert.equal(d.daemon.service.liveCount, 0);
    console.log(`# ${refused.length} unauthenticated requests, every one 401`);
  });

  it("serves only healthz without the key, under its own spellings, GET and HEAD", async () => {
    for (const target of ["/v1/healthz", "/v1/%68ealthz", "/v1/healthz?x", "http://x/v1/healthz"]) {
      const r = await send("GET", target, null);
      assert.equal(r.status, 200, `GET ${target}: ${r.raw}`);
      assert.equal(r.body, "ok");
      assert.equal((await send("HEAD", target, null)).status, 200, `HEAD ${target}`);
    }
    for (const target of ["/v1/healthz/", "//v1/healthz", "/v1/HEALTHZ"]) {
      assert.equal((await send("GET", target, null)).status, 401, `${target} is no route: 401`);
    }
  });

  it("refuses CONNECT, Upgrade, OPTIONS * and a request pipelined after healthz", async () => {
    const connectReply = await rawRequest(
      port,
      "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
    );
    assert.equal(connectReply.raw, "", "CONNECT is closed without an answer");
    const upgrade = await rawRequest(
      port,
      requestText("GET", "/%761/sandboxes", { connection: "Upgrade", upgrade: "websocket" }),
    );
    assert.ok(upgrade.status === 401 || upgrade.raw === "", upgrade.raw);
    assert.equal((await rawRequest(port, requestText("OPTIONS", "*", {}))).status, 401);
    // healthz (public) on a kept-alive connection, then a list in the same write.
    const pipelined = await rawRequest(
      port,
      "GET /v1/healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" +
        requestText("GET", "/%761/sandboxes", {}),
    );
    const statuses = [...pipelined.raw.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => m[1]);
    assert.deepEqual(statuses, ["200", "401"], pipelined.raw);
    assert.ok(!pipelined.raw.includes('"sandboxes"'));
  });

  it("with the key, each spelling reaches its route or gets a clear 4xx", async () => {
    for (const [target, getStatus, postStatus] of LIST_SPELLINGS) {
      const g = await send("GET", target, KEY);
      assert.equal(g.status, getStatus, `GET ${target}: ${g.raw.slice(0, 300)}`);
      if (getStatus === 200) assert.deepEqual(JSON.parse(g.body), { sandboxes: [] });
      else contractError(g, getStatus === 404 ? "not_found" : "bad_request");
      assert.equal((await send("HEAD", target, KEY)).status, getStatus, `HEAD ${target}`);
      const p = await send("POST", target, KEY, '{"vcpu_count": 0}');
      assert.equal(p.status, postStatus, `POST ${target}: ${p.raw.slice(0, 300)}`);
      if (postStatus === 400 && getStatus === 200) assert.match(p.body, /vcpu_count/);
    }
    for (const [method, target, status] of OTHER_SPELLINGS) {
      const r = await send(method, target, KEY);
      assert.equal(r.status, status, `${method} ${target}: ${r.raw.slice(0, 300)}`);
      if (target.includes("etrics") && status === 200) assert.match(r.body, /podflare_/);
    }
    assert.equal(sandboxRows(d), 0, "the invalid creates were refused by the schema");
  });
});

describe("no key configured: only loopback Host names are served (DNS rebinding)", () => {
  let d: TestDaemon;
  let port: number;
  before(async () => {
    d = await startTestDaemon({ poolSize: 0 });
    port = portOf(d.url);
  });
  after(async () => {
    await d?.close();
  });

  const REBINDING = [
    "evil.example",
    "127.0.0.1.evil.example",
    "attacker:7070",
    "localhost.evil.example",
    "evil.localhost",
    "localhost.",
    "10.0.0.1",
    "0.0.0.0",
  ];

  it("refuses a rebinding Host on every route, healthz too, and creates nothing", async () => {
    for (const host of [...REBINDING, `evil.example:${port}`]) {
      for (const [method, target, body] of [
        ["GET", "/v1/sandboxes", ""],
        ["POST", "/v1/sandboxes", "{}"],
        ["GET", "/v1/healthz", ""],
        ["GET", "/metrics", ""],
        ["GET", "/nothing-here", ""],
      ] as const) {
        const r = await rawRequest(port, requestText(method, target, { host }, body));
        assert.equal(r.status, 403, `${method} ${target} Host ${host}: ${r.raw.slice(0, 300)}`);
        contractError(r, "forbidden");
        assert.match(r.body, /127\.0\.0\.1|podflare keys create/);
      }
    }
    // No Host at all (HTTP/1.0), a second Host, an absolute-form target naming another host.
    const noHost = await rawRequest(port, "GET /v1/sandboxes HTTP/1.0\r\n\r\n");
    assert.equal(noHost.status, 403, noHost.raw);
    assert.match(noHost.body, /without a Host header/);
    const twoHosts = await rawRequest(
      port,
      "GET /v1/sandboxes HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nconnection: close\r\n\r\n",
    );
    assert.ok(twoHosts.status === 403 || twoHosts.status === 400, twoHosts.raw);
    const absolute = await rawRequest(
      port,
      requestText("GET", "http://evil.example/v1/sandboxes", { host: "localhost" }),
    );
    assert.equal(absolute.status, 403, absolute.raw);
    assert.equal(sandboxRows(d), 0);
  });

  it("serves localhost, 127.0.0.1 and [::1], with or without the port", async () => {
    for (const host of [
      `localhost:${port}`,
      "localhost",
      "LOCALHOST",
      "127.0.0.1",
      `127.0.0.1:${port}`,
      "[::1]",
      `[::1]:${port}`,
    ]) {
      const r = await rawRequest(port, requestText("GET", "/v1/sandboxes", { host }));
      assert.equal(r.status, 200, `Host ${host}: ${r.raw.slice(0, 300)}`);
      assert.deepEqual(JSON.parse(r.body), { sandboxes: [] });
    }
    const abs = await rawRequest(
      port,
      requestText("GET", `http://127.0.0.1:${port}/v1/healthz`, {}),
    );
    assert.equal(abs.status, 200, abs.raw);
  });
});

describe("no key, listening beyond loopback (PODFLARE_ALLOW_UNAUTHENTICATED=1)", () => {
  let d: TestDaemon;
  let port: number;
  before(async () => {
    d = await startTestDaemon({
      poolSize: 0,
      host: "0.0.0.0",
      allowUnauthenticated: true,
      allowedHosts: ["sandbox-host.internal"],
    });
    port = portOf(d.url);
  });
  after(async () => {
    await d?.close();
  });

  it("also serves IP literals and PODFLARE_ALLOWED_HOSTS names, never other names", async () => {
    for (const host of [
      "127.0.0.1",
      `10.9.8.7:${port}`,
      `[fe80::1]:${port}`,
      "sandbox-host.internal",
      `SANDBOX-HOST.internal:${port}`,
    ]) {
      const r = await rawRequest(port, requestText("GET", "/v1/sandboxes", { host }));
      assert.equal(r.status, 200, `Host ${host}: ${r.raw.slice(0, 300)}`);
    }
    for (const host of [
      "evil.example",
      "10.9.8.7.evil.example",
      "sandbox-host.internal.evil.example",
    ]) {
      const r = await rawRequest(port, requestText("POST", "/v1/sandboxes", { host }, "{}"));
      assert.equal(r.status, 403, `Host ${host}: ${r.raw.slice(0, 300)}`);
      assert.match(r.body, /PODFLARE_ALLOWED_HOSTS/);
    }
    assert.equal(sandboxRows(d), 0);
  });
});
