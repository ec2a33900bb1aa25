/**
 * Bounded accessors for fields of hostile JSON (a guest agent's headers, QEMU's QMP
 * replies). `String()` of an object whose `toString` is not a function, or of a deeply
 * nested array, throws; these never do, and never return more than asked for.
 */

/** A field as bounded text: strings, numbers and booleans; anything else is `fallback`. */
export function str(value: unknown, max: number, fallback = ""): string {
  if (typeof value === "string") return value.slice(0, max);
  if (typeof value === "number" || typeof value === "boolean") return String(value).slice(0, max);
  return fallback;
}

/** A non-negative safe integer field, else `fallback`. */
export function count(value: unknown, fallback: number): number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0 ? value : fallback;
}

/** A plain JSON object (not null, not an array), else null. */
export function record(value: unknown): Record<string, unknown> | null {
  return typeof value === "object" && value !== null && !Array.isArray(value)
    ? (value as Record<string, unknown>)
    : null;
}
