/** The daemon's structured logger (pino: one JSON object per line on stderr). */
import { pino } from "pino";

export type Logger = pino.Logger;

export function createLogger(level = "info"): Logger {
  return pino({ level, base: { svc: "podflared" } }, pino.destination(2));
}

/** A logger that drops everything: for library use and tests. */
export function silentLogger(): Logger {
  return pino({ level: "silent" });
}
