/**
 * An exec stream that is never idle on the wire: its response opens at once (an empty
 * line, so the status and headers leave before the code prints anything), and while the
 * code is silent an empty line follows every `everyMs`. Clients, proxies and load
 * balancers that cut a response after a while without bytes (the TypeScript SDK's
 * transport: 300 s for headers and between body bytes) never see a silent one; NDJSON
 * readers skip empty lines (both SDKs do).
 */
export async function* withHeartbeat(
  lines: AsyncIterable<string>,
  everyMs: number,
): AsyncGenerator<string> {
  yield "\n";
  const it = lines[Symbol.asyncIterator]();
  try {
    let next = it.next();
    for (;;) {
      let timer: NodeJS.Timeout | undefined;
      const beat =
        everyMs > 0
          ? new Promise<"beat">((resolve) => {
              timer = setTimeout(() => resolve("beat"), everyMs);
            })
          : null;
      const r = await (beat ? Promise.race([next, beat]) : next);
      clearTimeout(timer);
      if (r === "beat") {
        yield "\n";
        continue;
      }
      if (r.done) return;
      yield r.value;
      next = it.next();
    }
  } finally {
    await it.return?.();
  }
}
