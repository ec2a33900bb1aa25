/**
 * Hand QEMU an open file over its QMP socketpair (SCM_RIGHTS), for QMP's `add-fd`. Node
 * cannot attach ancillary data to a socket write, so a short Python helper (python3 is a
 * host dependency, see memfd.ts) inherits a duplicate of our end of the socketpair and
 * the file, and sends the one command line with the fd attached. The reply comes back to
 * our QMP client as to any command: the helper never reads.
 */
import { spawn } from "node:child_process";
import type { Socket } from "node:net";
import { python } from "./memfd.js";

const HELPER = String.raw`
import socket, sys
s = socket.socket(fileno=3)
data = sys.stdin.buffer.read()
sent = socket.send_fds(s, [data], [4])
while sent < len(data):
    sent += s.send(data[sent:])
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

/** Write `line` (one QMP command) to `qmpSocket` with `fd` attached. */
export function sendWithFd(qmpSocket: Socket, line: string, fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    // -I -S: no environment, no site packages (only the socket module is needed).
    const child = spawn(python(), ["-I", "-S", "-c", HELPER], {
      stdio: ["pipe", "ignore", "pipe", socketFd(qmpSocket), fd],
    });
    let stderr = "";
    child.stderr?.on("data", (c: Buffer) => {
      stderr = (stderr + c.toString()).slice(-2000);
    });
    child.once("error", reject);
    child.once("close", (code) => {
      if (code === 0) resolve();
      else reject(new Error(`fd helper exited with ${code}: ${stderr.trim()}`));
    });
    child.stdin?.end(line);
  });
}
