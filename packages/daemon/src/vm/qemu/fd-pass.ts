/**
 * Hand QEMU open files over its QMP socketpair (SCM_RIGHTS), for QMP's `add-fd`. Node
 * cannot attach ancillary data to a socket write, so a short Python helper (python3 is a
 * host dependency, see memfd.ts) inherits a duplicate of our end of the socketpair and
 * the files, and sends each command line it is given with the next file attached. The
 * replies come back to our QMP client as to any command: the helper never reads them.
 *
 * One helper carries a batch of files (a fork's device-state file and its overlay's two
 * descriptors: one process start instead of three), but strictly one at a time: QEMU's
 * socket chardev closes descriptors it received and no command has taken yet when the
 * next ones arrive, so each line goes only after the previous command's reply.
 */
import { type ChildProcess, spawn } from "node:child_process";
import type { Socket } from "node:net";
import { python } from "./memfd.js";

// Reads a line, sends it with the next inherited fd (4, 5, ...), says "ok"; exits at EOF.
const HELPER = String.raw`
import socket, sys
s = socket.socket(fileno=3)
fd = 4
while True:
    data = sys.stdin.buffer.readline()
    if not data:
        break
    sent = socket.send_fds(s, [data], [fd])
    while sent < len(data):
        sent += s.send(data[sent:])
    fd += 1
    sys.stdout.write("ok\n")
    sys.stdout.flush()
s.detach()
`;

/**
 * Our end's descriptor. By number, not as the Socket: a stream handed to spawn's stdio
 * stops being read by Node (it assumes the child took it over), and the replies would
 * never reach our QMP client.
 */
function socketFd(socket: Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== "number" || fd < 0) throw new Error("the QMP socket has no descriptor");
  return fd;
}

/** One helper process carrying `fds`, in order, each with one command line. */
export class FdCourier {
  private readonly child: ChildProcess;
  private readonly acks: (() => void)[] = [];
  private failure: Error | null = null;
  private readonly failed: ((err: Error) => void)[] = [];
  private stderr = "";
  private left: number;

  constructor(qmpSocket: Socket, fds: readonly number[]) {
    this.left = fds.length;
    // -I -S: no environment, no site packages (only the socket module is needed).
    this.child = spawn(python(), ["-I", "-S", "-c", HELPER], {
      stdio: ["pipe", "pipe", "pipe", socketFd(qmpSocket), ...fds],
    });
    let out = "";
    this.child.stdout?.setEncoding("utf8");
    this.child.stdout?.on("data", (c: string) => {
      out += c;
      for (let i = out.indexOf("\n"); i >= 0; i = out.indexOf("\n")) {
        out = out.slice(i + 1);
        this.acks.shift()?.();
      }
    });
    this.child.stderr?.on("data", (c: Buffer) => {
      this.stderr = (this.stderr + c.toString()).slice(-2000);
    });
    this.child.stdin?.on("error", () => {}); // an early exit surfaces below
    const fail = (err: Error) => {
      this.failure ??= err;
      for (const f of this.failed.splice(0)) f(this.failure);
    };
    this.child.once("error", fail);
    this.child.once("close", (code) => {
      if (this.acks.length > 0 || code !== 0)
        fail(new Error(`fd helper exited with ${code}: ${this.stderr.trim()}`));
    });
  }

  /** Write `line` (one QMP command) with the next file attached; resolves once it is sent. */
  send(line: string): Promise<void> {
    if (this.left-- <= 0) return Promise.reject(new Error("the fd helper has no file left"));
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.acks.push(resolve);
      this.failed.push(reject);
      this.child.stdin?.write(line.endsWith("\n") ? line : `${line}\n`);
    });
  }

  /** No more lines: the helper exits. */
  close(): void {
    this.child.stdin?.end();
  }
}
