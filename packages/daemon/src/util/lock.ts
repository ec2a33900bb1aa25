import { open, readFile, rm, stat } from "node:fs/promises";
import { setTimeout as delay } from "node:timers/promises";

/** Whether process `pid` exists (EPERM: it does, under another uid). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Run `fn` holding an exclusive lock file (O_EXCL create, our pid inside). A lock whose
 * holder has died is taken over; a live holder is waited for.
 */
export async function withFileLock<T>(path: string, fn: () => Promise<T>): Promise<T> {
  for (;;) {
    try {
      const handle = await open(path, "wx");
      await handle.writeFile(String(process.pid));
      await handle.close();
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      const holder = Number((await readFile(path, "utf8").catch(() => "")).trim());
      // An empty file is a lock whose holder has not written its pid yet, unless it is old.
      const age = Date.now() - ((await stat(path).catch(() => null))?.mtimeMs ?? 0);
      if (holder ? !alive(holder) : age > 10_000) {
        await rm(path, { force: true });
        continue;
      }
      await delay(250); // a build takes minutes; a quarter second of lateness is nothing
    }
  }
  try {
    return await fn();
  } finally {
    await rm(path, { force: true });
  }
}
