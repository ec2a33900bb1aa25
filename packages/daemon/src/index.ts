export { loadConfig, repoRoot, type Config } from "./config/config.js";
export { startDaemon, prepareEngine, type Daemon } from "./daemon.js";
export { ensureImage, type GuestImage } from "./image/build.js";
export { createLogger, silentLogger, type Logger } from "./util/logger.js";
