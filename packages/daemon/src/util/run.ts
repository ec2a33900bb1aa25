import { spawn } from "node:child_process";

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** Called with every complete output line (stdout and stderr), for progress display. */
  onLine?: (line: string) => void;
  /** Bytes of combined output kept for the error message. */
  keepTail?: number;
  stdin?: "ignore" | "inherit";
}

export class CommandError extends Error {
  constructor(
    readonly command: string,
    readonly exitCode: number | null,
    readonly tail: string,
  ) {
    super(`\`${command}\` failed (exit ${exitCode ?? "signal"}):\n${tail.trim()}`);
    this.name = "CommandError";
  }
}

/** Run a command to completion; resolve with its stdout, reject with CommandError. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<string> {
  const keep = opts.keepTail ?? 4000;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: [opts.stdin ?? "ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let tail = "";
    let partial = "";
    const onData = (isStdout: boolean) => (chunk: Buffer) => {
      const text = chunk.toString("utf8");
      if (isStdout && stdout.length < 16 * 1024 * 1024) stdout += text;
      tail = (tail + text).slice(-keep);
      if (opts.onLine) {
        const lines = (partial + text).split("\n");
        partial = lines.pop() ?? "";
        for (const line of lines) if (line.trim()) opts.onLine(line);
      }
    };
    child.stdout.on("data", onData(true));
    child.stderr.on("data", onData(false));
    child.on("error", (err: NodeJS.ErrnoException) => {
      reject(
        err.code === "ENOENT"
          ? new CommandError(cmd, null, `${cmd} is not installed (not found on PATH)`)
          : err,
      );
    });
    child.on("close", (code) => {
      if (code === 0) resolve(stdout);
      else reject(new CommandError([cmd, ...args].join(" ").slice(0, 200), code, tail));
    });
  });
}
