import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { loadConfig } from "./config.js";

/** Runs `fn`, then puts process.env back as it was (the tests set PODFLARE_* in it). */
function withRestoredEnv(fn: () => void): void {
  const saved = { ...process.env };
  try {
    fn();
  } finally {
    for (const k of Object.keys(process.env)) if (!(k in saved)) delete process.env[k];
    Object.assign(process.env, saved);
  }
}

describe("HTTP settings", () => {
  it("have generous defaults: uploads get an hour, headers 20 s", () => {
    const c = loadConfig({ stateDir: "/nonexistent" });
    assert.equal(c.httpHeadersTimeoutMs, 20_000);
    assert.equal(c.httpRequestTimeoutMs, 3_600_000);
    assert.equal(c.httpBodyIdleTimeoutMs, 60_000);
    assert.equal(c.httpKeepAliveTimeoutMs, 10_000);
    assert.equal(c.httpMaxConnections, 1024);
    assert.equal(c.httpStreamHeartbeatMs, 15_000);
    assert.deepEqual(c.allowedHosts, []);
  });

  it("read PODFLARE_* and refuse a headers timeout longer than the request timeout", () => {
    withRestoredEnv(() => {
      process.env.PODFLARE_ALLOWED_HOSTS = " Sandbox-Host.internal, ,b.internal";
      process.env.PODFLARE_HTTP_MAX_CONNECTIONS = "7";
      const c = loadConfig({ stateDir: "/nonexistent" });
      assert.deepEqual(c.allowedHosts, ["sandbox-host.internal", "b.internal"]);
      assert.equal(c.httpMaxConnections, 7);
      process.env.PODFLARE_HTTP_REQUEST_TIMEOUT_MS = "5000";
      assert.throws(() => loadConfig({ stateDir: "/nonexistent" }), /HEADERS_TIMEOUT_MS.*lower/);
      process.env.PODFLARE_HTTP_REQUEST_TIMEOUT_MS = "0"; // no total limit: any headers timeout
      assert.equal(loadConfig({ stateDir: "/nonexistent" }).httpRequestTimeoutMs, 0);
      process.env.PODFLARE_HTTP_MAX_CONNECTIONS = "-1";
      assert.throws(() => loadConfig({ stateDir: "/nonexistent" }), /non-negative integer/);
    });
  });

  it("resolve every path once, from the directories as overridden", () => {
    const c = loadConfig({ stateDir: "/s", shmDir: "/m", imagesDir: "/i", templatesDir: "/t" });
    assert.deepEqual(
      { ...c.paths },
      {
        stateDir: "/s",
        database: "/s/podflare.db",
        vmsDir: "/s/vms",
        layersDir: "/s/layers",
        shmDir: "/m",
        vmMemDir: "/m/vms",
        forksDir: "/m/forks",
        imagesDir: "/i",
        templatesDir: "/t",
        uidClaimsDir: "/run/podflare/vm-uids",
      },
    );
    assert.ok(Object.isFrozen(c.paths));
  });

  it("take the crash point and the host Python from the environment, once", () => {
    withRestoredEnv(() => {
      process.env.PODFLARE_CRASH_AT = "fork:admitted";
      process.env.PODFLARE_PYTHON = "/opt/py/bin/python3";
      const c = loadConfig({ stateDir: "/nonexistent" });
      assert.equal(c.crashAt, "fork:admitted");
      assert.equal(c.hostPython, "/opt/py/bin/python3");
      process.env.PODFLARE_CRASH_AT = "fork:nowhere";
      assert.throws(
        () => loadConfig({ stateDir: "/nonexistent" }),
        /PODFLARE_CRASH_AT=fork:nowhere is not one of create:admitted/,
      );
      delete process.env.PODFLARE_CRASH_AT;
      assert.equal(loadConfig({ stateDir: "/nonexistent" }).crashAt, null);
    });
  });
});
