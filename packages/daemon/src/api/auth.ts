/** Bearer-key check: keys are compared as SHA-256 digests in constant time. */
import { createHash, timingSafeEqual } from "node:crypto";

const digest = (key: string) => createHash("sha256").update(key).digest();

export function makeKeyChecker(
  keys: readonly string[],
): ((header: string | undefined) => boolean) | null {
  if (keys.length === 0) return null;
  const digests = keys.map(digest);
  return (header) => {
    const match = /^Bearer\s+(\S+)$/i.exec(header ?? "");
    if (!match?.[1]) return false;
    const given = digest(match[1]);
    let ok = false;
    for (const d of digests) ok = timingSafeEqual(d, given) || ok; // no early exit
    return ok;
  };
}
