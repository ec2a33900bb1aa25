/**
 * TEST SUPPORT, not production: a VmBackend (vm/backend.ts) without VMs, for unit tests
 * of what sits above the seam (warm pool, templates, sandbox service). Each fake VM has
 * a real AgentClient talking the real frame protocol to a tiny in-process guest that
 * answers hello, ping, restore and trivial execs:
 *   print('text') / print("text")  -> "text\n" on stdout, exit 0
 *   exit(N)                        -> exit N
 *   anything else                  -> no output, exit 0
 * The backend counts what it did and can be told to fail, so tests can check that a
 * failure leaves nothing behind (`live` holds every VM not yet destroyed).
 */
import { mkdirSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Duplex } from "node:stream";
import { AgentClient } from "../guest/agent-client.js";
import { encodeFrame, type Frame, FrameDecoder, PROTOCOL_VERSION } from "../guest/frames.js";
import type { GuestImage } from "../image/build.js";
import {
  BootError,
  type ForkResult,
  type LeftoversReport,
  type VmBackend,
  type VmExit,
  type VmHandle,
  type VmShape,
  type VmTemplate,
} from "../vm/backend.js";

/** Two connected in-memory streams: what one writes, the other reads. */
function duplexPair(): [Duplex, Duplex] {
  const ends: Duplex[] = [];
  const make = (peer: () => Duplex) =>
    new Duplex({
      read() {},
      write(chunk, _encoding, done) {
        peer().push(chunk);
        done();
      },
      final(done) {
        peer().push(null);
        done();
      },
      destroy(err, done) {
        const other = peer();
        if (!other.destroyed) other.destroy();
        done(err);
      },
    });
  ends.push(
    make(() => ends[1] as Duplex),
    make(() => ends[0] as Duplex),
  );
  return [ends[0] as Duplex, ends[1] as Duplex];
}

/** The guest's end of the agent channel. */
class FakeGuest {
  private readonly decoder = new FrameDecoder();

  constructor(private readonly stream: Duplex) {
    stream.on("data", (chunk: Buffer) => {
      for (const frame of this.decoder.push(chunk)) this.answer(frame);
    });
    stream.on("error", () => {});
  }

  private send(header: Record<string, unknown>, payload?: Buffer): void {
    if (!this.stream.destroyed) this.stream.write(encodeFrame({ type: "", ...header }, payload));
  }

  private answer({ header, payload }: Frame): void {
    const id = header.id;
    switch (header.type) {
      case "hello":
        this.send({ type: "hello", id, version: PROTOCOL_VERSION, agent: "fake", pid: 1 });
        return;
      case "ping":
        this.send({ type: "pong", id });
        return;
      case "restore":
        this.send({ type: "ok", id });
        return;
      case "exec": {
        const code = payload.toString("utf8").trim();
        const printed = /^print\((['"])(.*)\1\)$/.exec(code);
        if (printed)
          this.send({ type: "output", id, stream: "stdout" }, Buffer.from(`${printed[2]}\n`));
        const exited = /^exit\((\d+)\)$/.exec(code);
        this.send({ type: "exit", id, code: exited ? Number(exited[1]) : 0 });
        return;
      }
      default:
        this.send({
          type: "error",
          id,
          code: "unsupported",
          message: `fake guest: ${header.type}`,
        });
    }
  }
}

let nextPid = 10_000;

export class FakeVm implements VmHandle {
  readonly agent: AgentClient;
  readonly pid = nextPid++;
  readonly exited: Promise<VmExit>;
  diskChain: string[] = [];
  /** The CPU priority it was last given. */
  nice: number;
  /** Paused by a full disk (fillDisk) until resume(). */
  paused = false;
  private exitInfo: VmExit | null = null;
  private onExit!: (exit: VmExit) => void;
  private readonly diskFull: (() => void)[] = [];
  private destroying: Promise<void> | null = null;

  constructor(
    readonly id: string,
    readonly shape: VmShape,
    nice: number,
    private readonly onDestroyed: (vm: FakeVm) => void,
  ) {
    this.nice = nice;
    const [host, guest] = duplexPair();
    new FakeGuest(guest);
    this.agent = new AgentClient(host);
    this.exited = new Promise((resolve) => {
      this.onExit = resolve;
    });
  }

  get alive(): boolean {
    return this.exitInfo === null && !this.agent.closed;
  }

  get hasExited(): boolean {
    return this.exitInfo !== null;
  }

  /** The VM's process ends on its own (a crash). */
  crash(): void {
    this.exit({ code: null, signal: "SIGSEGV" });
  }

  /** A disk write met a full host disk: the VM pauses itself. */
  fillDisk(): void {
    this.paused = true;
    for (const listener of this.diskFull) listener();
  }

  onDiskFull(listener: () => void): void {
    this.diskFull.push(listener);
    if (this.paused) queueMicrotask(listener);
  }

  get stoppedForDisk(): boolean {
    return this.paused;
  }

  async resume(): Promise<void> {
    this.paused = false;
  }

  async renice(nice: number): Promise<void> {
    this.nice = nice;
  }

  destroy(): Promise<void> {
    this.destroying ??= (async () => {
      this.agent.close();
      this.exit({ code: null, signal: "SIGKILL" });
      await new Promise((resolve) => setImmediate(resolve));
      this.onDestroyed(this);
    })();
    return this.destroying;
  }

  private exit(info: VmExit): void {
    if (this.exitInfo) return;
    this.exitInfo = info;
    this.agent.close("the fake VM exited");
    this.onExit(info);
  }
}

interface FakeTemplate extends VmTemplate {
  dir: string;
}

export class FakeBackend implements VmBackend {
  readonly identity = { version: "fake backend 1", accel: "tcg" as const };
  readonly sealedTemplateMemory = false;
  /** Every VM not destroyed yet. */
  readonly live = new Set<FakeVm>();
  boots = 0;
  restores = 0;
  snapshots = 0;
  forks = 0;
  /** How many of the next restores (and fork children) fail. */
  failRestores = 0;
  /** How many of the next snapshots fail. */
  failSnapshots = 0;

  constructor(readonly memOverheadMib = 0) {}

  makeDir(dir: string): string {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    return dir;
  }

  /** Fake VMs live in this process only: an earlier run leaves nothing. */
  async removeLeftovers(): Promise<LeftoversReport> {
    return { processesKilled: 0, filesRemoved: 0, cgroupsRemoved: 0 };
  }

  async boot(id: string, shape: VmShape): Promise<FakeVm> {
    this.boots++;
    return this.start(id, shape, 0);
  }

  async restore(id: string, template: VmTemplate, nice = 0): Promise<FakeVm> {
    this.restores++;
    await new Promise((resolve) => setImmediate(resolve)); // a restore takes a while
    if (this.failRestores > 0) {
      this.failRestores--;
      throw new BootError(`fake restore of ${id} failed`);
    }
    return this.start(id, template.shape, nice);
  }

  async snapshot(
    id: string,
    shape: VmShape,
    _image: GuestImage,
    workDir: string,
    _finalDir: string,
    warm: (agent: AgentClient) => Promise<void>,
  ): Promise<void> {
    this.snapshots++;
    await mkdir(workDir, { recursive: true, mode: 0o700 });
    const vm = await this.boot(id, shape);
    try {
      if (this.failSnapshots > 0) {
        this.failSnapshots--;
        throw new BootError(`fake snapshot of ${id} failed`);
      }
      await warm(vm.agent);
      await writeFile(join(workDir, "fake-template"), JSON.stringify(shape));
    } finally {
      await vm.destroy();
    }
  }

  template(dir: string, key: string, shape: VmShape): FakeTemplate {
    return { key, shape, dir };
  }

  async templateResidentMib(): Promise<number | null> {
    return null;
  }

  async exposeTemplate(): Promise<void> {}

  /** Awaited inside each fork before its children are made (tests look at a fork in flight). */
  forkGate: (() => Promise<void>) | null = null;

  async fork(parent: VmHandle, childIds: readonly string[]): Promise<ForkResult> {
    this.forks++;
    const children: FakeVm[] = [];
    try {
      await this.forkGate?.();
      for (const id of childIds)
        children.push(await this.restore(id, { key: `fork-${parent.id}`, shape: parent.shape }));
    } catch (err) {
      await Promise.all(children.map((c) => c.destroy()));
      throw err;
    }
    return { children, pausedMs: 0 };
  }

  async flatten(vm: VmHandle): Promise<void> {
    if (vm instanceof FakeVm) vm.diskChain = vm.diskChain.slice(0, 1);
  }

  async forkLayers(): Promise<{ count: number; bytes: number }> {
    return { count: 0, bytes: 0 };
  }

  private async start(id: string, shape: VmShape, nice: number): Promise<FakeVm> {
    const vm = new FakeVm(id, shape, nice, (v) => this.live.delete(v));
    this.live.add(vm);
    await vm.agent.restore(
      { entropy: Buffer.alloc(64), timeNs: 0n, hostname: id, machineId: "0".repeat(32) },
      1_000,
    );
    return vm;
  }
}
