import assert from "node:assert/strict";
import { Duplex, PassThrough } from "node:stream";
import { describe, it } from "node:test";
import { QmpClient, QmpClosedError, QmpError, QmpTimeoutError } from "./client.js";

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
