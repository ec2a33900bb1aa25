import assert from "node:assert/strict";
import { once } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Duplex, PassThrough } from "node:stream";
import { describe, it } from "node:test";
import {
  QmpClient,
  QmpClosedError,
  QmpError,
  type QmpEvent,
  QmpTimeoutError,
} from "./qmp-client.js";

/** A fake QEMU end: what the client writes arrives on `fromClient`; we answer on `toClient`. */
function pair() {
  const toClient = new PassThrough();
  const fromClient = new PassThrough();
  const stream = Duplex.from({ readable: toClient, writable: fromClient });
  const sent: Record<string, unknown>[] = [];
  fromClient.setEncoding("utf8");
  let buf = "";
  fromClient.on("data", (c: string) => {
    buf += c;
    let i = buf.indexOf("\n");
    while (i >= 0) {
      sent.push(JSON.parse(buf.slice(0, i)));
      buf = buf.slice(i + 1);
      i = buf.indexOf("\n");
    }
  });
  const reply = (obj: unknown) => toClient.write(`${JSON.stringify(obj)}\r\n`);
  return { client: new QmpClient(stream), sent, reply, toClient };
}

const GREETING = {
  QMP: { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: "" }, capabilities: ["oob"] },
};
const tick = () => new Promise((r) => setImmediate(r));

describe("QMP client", () => {
  it("lets another writer send a command line (an fd attached) and matches its reply", async () => {
    const { client, sent, reply } = pair();
    const lines: string[] = [];
    const adding = client.executeWith("add-fd", { "fdset-id": 100, opaque: "rw" }, async (line) => {
      lines.push(line);
    });
    await tick();
    assert.equal(sent.length, 0, "the client itself wrote nothing");
    const msg = JSON.parse(lines[0] ?? "{}");
    assert.equal(msg.execute, "add-fd");
    assert.deepEqual(msg.arguments, { "fdset-id": 100, opaque: "rw" });
    assert.ok((lines[0] ?? "").endsWith("\n"));
    reply({ return: { "fdset-id": 100, fd: 9 }, id: msg.id });
    assert.deepEqual(await adding, { "fdset-id": 100, fd: 9 });
    // A writer that fails rejects the command at once.
    await assert.rejects(
      client.executeWith("add-fd", { "fdset-id": 101 }, async () => {
        throw new Error("helper died");
      }),
      /helper died/,
    );
  });

  it("negotiates capabilities after the greeting and matches replies by id", async () => {
    const { client, sent, reply } = pair();
    const connecting = client.connect(1000);
    reply(GREETING);
    await tick();
    assert.equal(sent[0]?.execute, "qmp_capabilities");
    reply({ return: {}, id: sent[0]?.id });
    const greeting = await connecting;
    assert.equal(greeting.version.qemu.major, 7);

    const a = client.execute("query-status", {});
    const b = client.execute("stop", {});
    await tick();
    reply({ return: {}, id: sent[2]?.id }); // out of order
    reply({ return: { status: "running", running: true }, id: sent[1]?.id });
    assert.deepEqual(await a, { status: "running", running: true });
    assert.deepEqual(await b, {});
  });

  it("turns error replies into QmpError and delivers events", async () => {
    const { client, sent, reply } = pair();
    const events: string[] = [];
    client.on("event", (e) => events.push(e.event));
    const p = client.execute("cont", {});
    await tick();
    reply({ event: "RESUME", data: {}, timestamp: { seconds: 1, microseconds: 2 } });
    reply({ error: { class: "GenericError", desc: "nope" }, id: sent[0]?.id });
    await assert.rejects(p, (e) => e instanceof QmpError && e.desc === "nope");
    assert.deepEqual(events, ["RESUME"]);
    const waiting = client.waitForEvent("STOP", 1000);
    reply({ event: "STOP", data: {} });
    assert.equal((await waiting).event, "STOP");
  });

  it("times out a command that gets no reply", async () => {
    const { client } = pair();
    await assert.rejects(client.execute("stop", {}, 20), QmpTimeoutError);
  });

  it("closes on garbage or an overlong line and fails pending commands", async () => {
    const { client, toClient } = pair();
    const p = client.execute("stop", {});
    toClient.write("this is not json\n");
    await assert.rejects(p, QmpClosedError);
    assert.ok(client.closed);

    const other = pair();
    const q = other.client.execute("stop", {});
    other.toClient.write("x".repeat(1024 * 1024 + 10));
    await assert.rejects(q, /longer than/);
    await assert.rejects(other.client.execute("cont", {}), QmpClosedError);
  });
});

/**
 * A hostile QEMU on a real unix socket: it answers each command with whatever `answer`
 * returns for it (a raw line, so it may be anything but valid QMP).
 */
async function hostileQemu(answer: (cmd: { execute: string; id: unknown }) => string | null) {
  const dir = await mkdtemp(join(tmpdir(), "podflare-qmp-"));
  const path = join(dir, "qmp.sock");
  const server = createServer((sock) => {
    sock.write(`${JSON.stringify(GREETING)}\r\n`);
    let buf = "";
    sock.setEncoding("utf8");
    sock.on("data", (c: string) => {
      buf += c;
      for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
        const cmd = JSON.parse(buf.slice(0, i));
        buf = buf.slice(i + 1);
        const line =
          cmd.execute === "qmp_capabilities"
            ? JSON.stringify({ return: {}, id: cmd.id })
            : answer(cmd);
        if (line !== null) sock.write(`${line}\r\n`);
      }
    });
    sock.on("error", () => {});
  });
  await new Promise<void>((r) => server.listen(path, r));
  const sock = connect(path);
  await once(sock, "connect");
  const client = new QmpClient(sock);
  await client.connect(2000);
  return {
    client,
    async close() {
      client.close();
      await new Promise((r) => server.close(r));
      await rm(dir, { recursive: true, force: true });
    },
  };
}

describe("QMP client against a hostile QEMU", () => {
  it("a hostile reply rejects the command with a clear error and never throws out of the socket", async () => {
    const uncaught: unknown[] = [];
    const onUncaught = (err: unknown) => uncaught.push(err);
    process.on("uncaughtException", onUncaught);
    try {
      const replies: ((id: unknown) => unknown)[] = [
        // String() of these throws: this crashed the daemon from inside the data handler.
        (id) => ({ error: { class: { toString: 1 }, desc: { toString: 1 } }, id }),
        (id) => ({ error: { class: [[[{ toString: 1 }]]], desc: "x".repeat(100_000) }, id }),
        (id) => ({ error: [1, 2], id }),
        (id) => ({ return: 42, id }),
        (id) => ({ return: null, id }),
        (id) => ({ return: [{ toString: 1 }], id }),
        (id) => ({ id }),
      ];
      let next = 0;
      const q = await hostileQemu((cmd) => {
        const make = replies[next++];
        return make ? JSON.stringify(make(cmd.id)) : null;
      });
      const outcomes: string[] = [];
      for (let i = 0; i < replies.length; i++) {
        await assert.rejects(q.client.execute("stop", {}, 2000), (e) => {
          assert.ok(e instanceof QmpError, `got ${String(e)}`);
          assert.match(e.message, /^QMP stop failed: \w+: /);
          assert.ok(e.message.length < 5000, "a hostile desc is bounded");
          outcomes.push(`${e.errorClass}: ${e.desc.slice(0, 40)}`);
          return true;
        });
      }
      console.log(outcomes.join("\n"));
      assert.equal(outcomes[0], "GenericError: (QEMU gave no description)");
      assert.ok(!q.client.closed, "the connection stays usable");
      await q.close();
    } finally {
      process.off("uncaughtException", onUncaught);
    }
    assert.deepEqual(uncaught, []);
  });

  it("a list-returning command (query-fdsets) takes only an array; every other one only an object", async () => {
    const q = await hostileQemu((cmd) =>
      JSON.stringify(
        cmd.execute === "query-fdsets"
          ? { return: [{ "fdset-id": 1, fds: [{ fd: 9, opaque: "ro" }] }], id: cmd.id }
          : { return: [], id: cmd.id },
      ),
    );
    assert.deepEqual(await q.client.execute("query-fdsets", {}, 2000), [
      { "fdset-id": 1, fds: [{ fd: 9, opaque: "ro" }] },
    ]);
    await assert.rejects(q.client.execute("stop", {}, 2000), /not a JSON object/);
    await q.close();
    const r = await hostileQemu((cmd) => JSON.stringify({ return: { x: 1 }, id: cmd.id }));
    await assert.rejects(r.client.execute("query-fdsets", {}, 2000), /not a JSON array/);
    await r.close();
  });

  it("hostile events and greetings are sanitised; a listener tripping over one closes QMP, not the daemon", async () => {
    const { client, reply } = pair();
    const events: QmpEvent[] = [];
    client.on("event", (e) => events.push(e));
    const connecting = client.connect(1000);
    reply({
      QMP: { version: { qemu: { major: { toString: 1 } }, package: [1] }, capabilities: 7 },
    });
    await tick();
    reply({ return: {}, id: "pf-1" });
    const greeting = await connecting;
    assert.deepEqual(greeting, {
      version: { qemu: { major: 0, minor: 0, micro: 0 }, package: "" },
      capabilities: [],
    });
    reply({ event: { toString: 1 }, data: {} }); // not an event name: ignored
    reply({ event: "E".repeat(10_000), data: [1], timestamp: { seconds: "x" } });
    await tick();
    assert.equal(events.length, 1);
    assert.equal(events[0]?.event.length, 128);
    assert.deepEqual(events[0]?.data, {});
    assert.deepEqual(events[0]?.timestamp, { seconds: 0, microseconds: 0 });

    // A waiter whose match reads deeper than the event has: the throw stays inside.
    const waiting = client.waitForEvent(
      "BLOCK_JOB_COMPLETED",
      1000,
      (e) => (e.data.job as { id: string }).id === "x",
    );
    reply({ event: "BLOCK_JOB_COMPLETED", data: {} });
    await assert.rejects(waiting, QmpClosedError);
    assert.ok(client.closed);
  });

  it("a long line in tiny pieces is reassembled", async () => {
    const { client, toClient, sent } = pair();
    const p = client.execute("query-status", {});
    await tick();
    const line = `${JSON.stringify({ return: { status: "running", running: true, pad: "x".repeat(900_000) }, id: sent[0]?.id })}\n`;
    const t0 = performance.now();
    for (let i = 0; i < line.length; i += 16) toClient.write(line.slice(i, i + 16));
    const ret = await p;
    const ms = performance.now() - t0;
    console.log(`900 KB QMP line in 16-byte pieces: ${ms.toFixed(0)} ms`);
    assert.equal(ret.status, "running");
    assert.ok(ms < 5000, `took ${ms} ms`);
  });
});
