/** A sandbox's lifetime as a timer: it fires once at its expiry time and never holds the process. */

/** setTimeout's longest delay (about 24.8 days): a longer wait is cut to it. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export function armExpiry(expiresAt: number, onExpire: () => void): NodeJS.Timeout {
  const timer = setTimeout(onExpire, Math.min(Math.max(0, expiresAt - Date.now()), MAX_TIMER_MS));
  timer.unref();
  return timer;
}
