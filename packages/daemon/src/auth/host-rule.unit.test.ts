import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { hostAllowed, hostName, isLoopbackHost, requestHosts } from "./host-rule.js";

const LOOPBACK_BIND = { bindHost: "127.0.0.1", allowedHosts: [] };

describe("the Host rule for a daemon without keys", () => {
  it("parses Host headers strictly", () => {
    assert.equal(hostName("LocalHost:7070"), "localhost");
    assert.equal(hostName("[::1]:7070"), "::1");
    assert.equal(hostName("[::1]"), "::1");
    assert.equal(hostName("127.0.0.1"), "127.0.0.1");
    for (const bad of [
      undefined,
      "",
      "localhost:",
      "localhost:7070:1",
      "[::1",
      "[nope]",
      "a b",
      "x/y",
      "user@localhost",
      "localhost:123456",
    ])
      assert.equal(hostName(bad), null, String(bad));
  });

  it("knows loopback names, and nothing that merely starts like one", () => {
    for (const h of [
      "localhost",
      "LOCALHOST",
      "localhost:7070",
      "127.0.0.1",
      "127.0.0.1:7070",
      "127.1.2.3",
      "[::1]",
      "[::1]:7070",
    ])
      assert.ok(isLoopbackHost(h), h);
    for (const h of [
      undefined,
      "",
      "evil.example",
      "127.0.0.1.evil.example",
      "localhost.evil.example",
      "localhost.",
      "evil.localhost",
      "attacker:7070",
      "127.0.0.256",
      "[::2]",
      "0.0.0.0",
      "::1",
      "[::ffff:127.0.0.1]",
    ])
      assert.ok(!isLoopbackHost(h), String(h));
  });

  it("on a loopback bind, accepts only loopback names", () => {
    for (const h of ["localhost:7070", "127.0.0.1", "[::1]:7070"])
      assert.ok(hostAllowed(h, LOOPBACK_BIND), h);
    for (const h of [
      undefined,
      "evil.example",
      "127.0.0.1.evil.example",
      "attacker:7070",
      "10.0.0.5",
      "[fe80::1]",
    ])
      assert.ok(!hostAllowed(h, LOOPBACK_BIND), String(h));
  });

  it("beyond loopback (--allow-unauthenticated), also IP literals and the listed names", () => {
    const rule = { bindHost: "0.0.0.0", allowedHosts: ["sandbox-host.internal"] };
    for (const h of [
      "localhost",
      "10.0.0.5:7070",
      "[fe80::1]:7070",
      "sandbox-host.internal:7070",
      "SANDBOX-HOST.internal",
    ])
      assert.ok(hostAllowed(h, rule), h);
    for (const h of [
      undefined,
      "evil.example",
      "10.0.0.5.evil.example",
      "sandbox-host.internal.evil.example",
      "internal",
    ])
      assert.ok(!hostAllowed(h, rule), String(h));
    // A listed name is accepted on a loopback bind too (a local alias), IP literals are not.
    assert.ok(hostAllowed("sandbox-host.internal", { ...rule, bindHost: "127.0.0.1" }));
    assert.ok(!hostAllowed("10.0.0.5", { ...rule, bindHost: "127.0.0.1" }));
  });

  it("collects every Host header and an absolute-form target's authority", () => {
    assert.deepEqual(requestHosts(["Host", "a", "X", "y", "HOST", "b"], "/v1/sandboxes"), [
      "a",
      "b",
    ]);
    assert.deepEqual(requestHosts(["host", "localhost"], "http://evil.example:80/v1/x"), [
      "localhost",
      "evil.example:80",
    ]);
    assert.deepEqual(requestHosts(["host", "localhost"], "http://u:p@evil.example/v1/x"), [
      "localhost",
      "evil.example",
    ]);
    assert.deepEqual(requestHosts([], "*"), []);
    assert.deepEqual(requestHosts(["host", "localhost"], "garbage"), ["localhost", ""]);
  });
});
