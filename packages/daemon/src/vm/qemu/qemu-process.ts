/**
 * One QEMU process and its three host channels. QEMU runs under `setpriv --pdeathsig
 * KILL`, so it dies with the daemon even on `kill -9`: no VM can outlive its owner; when
 * the daemon runs as root, setpriv also switches it to the VM's own uid and gid.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { readdir } from "node:fs/promises";
import type { Socket } from "node:net";
import { setPriority } from "node:os";
import type { Duplex } from "node:stream";
import { ConsoleLog } from "./console-log.js";
import { FdCourier } from "./fd-pass.js";
import { FD_AGENT, FD_CONSOLE, FD_QMP, type QemuCredentials, qemuCommand } from "./qemu-args.js";
import { QmpClient, type QmpEvent } from "./qmp-client.js";

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export class QemuProcess {
  readonly qmp: QmpClient;
  readonly agentStream: Duplex;
  readonly exited: Promise<QemuExit>;
  private exitInfo: QemuExit | null = null;
  /** Called by renice (the VM's cgroup follows its priority: nice alone does not cross cgroups). */
  onRenice: ((nice: number) => Promise<void>) | null = null;
  private stderrTail = "";
  private readonly qmpSocket: Socket;
  /**
   * QEMU stopped the guest because a disk write met a full host disk (virtio-blk
   * `werror=enospc`), and has not run it since. Tracked from QEMU's first event on, so a
   * stop during the VM's own start (a pooled VM's restore) is not missed.
   */
  private diskFullStop = false;
  private readonly diskFullListeners: (() => void)[] = [];

  private constructor(
    private readonly child: ChildProcess,
    readonly console: ConsoleLog,
  ) {
    const stdio = child.stdio as unknown as (Duplex | null)[];
    const qmpStream = stdio[FD_QMP];
    const agentStream = stdio[FD_AGENT];
    const consoleStream = stdio[FD_CONSOLE];
    if (!qmpStream || !agentStream || !consoleStream)
      throw new Error("QEMU channels were not created");
    this.qmp = new QmpClient(qmpStream);
    this.qmpSocket = qmpStream as Socket;
    this.qmp.on("event", (e: QmpEvent) => this.onEvent(e));
    this.agentStream = agentStream;
    consoleStream.on("data", (chunk: Buffer) => console.write(chunk));
    consoleStream.on("error", () => {});
    child.stderr?.on("data", (chunk: Buffer) => {
      this.stderrTail = (this.stderrTail + chunk.toString("utf8")).slice(-4096);
    });
    this.exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        this.exitInfo = { code, signal };
        this.qmp.close("QEMU exited");
        console.close();
        resolve(this.exitInfo);
      });
    });
  }

  /**
   * `extraFds` are inherited as fds 6, 7, ... (a snapshot's device state, guest memory).
   * `creds`: run QEMU as this uid/gid (the daemon must be root).
   */
  static spawn(
    qemuBinary: string,
    args: string[],
    consolePath: string,
    consoleMaxBytes: number,
    extraFds: (number | "ignore")[] = [],
    nice = 0,
    creds: QemuCredentials | null = null,
  ): QemuProcess {
    const consoleLog = new ConsoleLog(consolePath, consoleMaxBytes);
    // nice applies before QEMU starts, so every thread it creates inherits it.
    const argv = qemuCommand(qemuBinary, args, { nice, creds });
    const child = spawn(argv[0] as string, argv.slice(1), {
      stdio: ["ignore", "ignore", "pipe", "pipe", "pipe", "pipe", ...extraFds],
    });
    const proc = new QemuProcess(child, consoleLog);
    child.on("error", () => {}); // surfaces as an exit with code null
    return proc;
  }

  /**
   * Give QEMU open files, each in its fdset (QMP add-fd, one after the other, all sent
   * by one helper over the QMP socketpair); returns QEMU's number for each (for
   * remove-fd). The fds stay ours to close.
   */
  async addFds(files: readonly { fdset: number; fd: number; opaque: string }[]): Promise<number[]> {
    const courier = new FdCourier(
      this.qmpSocket,
      files.map((f) => f.fd),
    );
    try {
      const numbers: number[] = [];
      for (const f of files) {
        const r = await this.qmp.executeWith(
          "add-fd",
          { "fdset-id": f.fdset, opaque: f.opaque },
          (line) => courier.send(line),
        );
        numbers.push(r.fd);
      }
      return numbers;
    } finally {
      courier.close();
    }
  }

  async addFd(fdsetId: number, fd: number, opaque: string): Promise<number> {
    return (await this.addFds([{ fdset: fdsetId, fd, opaque }]))[0] as number;
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** QEMU stopped the guest on a full host disk and it has not run since. */
  get stoppedForDisk(): boolean {
    return this.diskFullStop;
  }

  /**
   * `listener` runs each time QEMU stops the guest on a full host disk; at once (on the
   * next tick) if it is stopped so now.
   */
  onDiskFull(listener: () => void): void {
    this.diskFullListeners.push(listener);
    if (this.diskFullStop) queueMicrotask(listener);
  }

  private onEvent(e: QmpEvent): void {
    if (e.event === "RESUME") {
      this.diskFullStop = false;
      return;
    }
    if (e.event !== "BLOCK_IO_ERROR") return;
    const data = e.data as { nospace?: unknown; action?: unknown } | undefined;
    if (data?.nospace !== true || data.action !== "stop") return;
    this.diskFullStop = true;
    for (const listener of this.diskFullListeners) listener();
  }

  get hasExited(): boolean {
    return this.exitInfo !== null;
  }

  /** What QEMU and the guest said last: for error messages. */
  diagnostics(): string {
    const parts: string[] = [];
    if (this.stderrTail.trim()) parts.push(`qemu: ${this.stderrTail.trim().slice(-1500)}`);
    const con = this.console.tail().trim();
    if (con) parts.push(`console: …${con.slice(-1500)}`);
    return parts.join("\n");
  }

  /** Set the scheduling priority of every QEMU thread (vCPUs included). */
  async renice(nice: number): Promise<void> {
    const pid = this.child.pid;
    if (!pid || this.exitInfo) return;
    await this.onRenice?.(nice).catch(() => {});
    const tasks = await readdir(`/proc/${pid}/task`).catch(() => [] as string[]);
    for (const tid of tasks) {
      try {
        setPriority(Number(tid), nice);
      } catch {
        // the thread ended meanwhile
      }
    }
  }

  async kill(): Promise<QemuExit> {
    if (!this.exitInfo) this.child.kill("SIGKILL");
    return this.exited;
  }
}
