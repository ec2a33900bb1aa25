export { Authenticator, isLoopback } from "./auth/authenticator.js";
export { type ApiKeyRecord, KeyStore } from "./auth/keys.js";
export { type Config, loadConfig, repoRoot } from "./config/config.js";
export { type Daemon, prepareEngine, startDaemon } from "./daemon.js";
export { ensureImage, type GuestImage } from "./image/build.js";
export { qemuVersion, TemplateManager, templateKey } from "./pool/templates.js";
export { Store } from "./store/db.js";
export { createLogger, type Logger, silentLogger } from "./util/logger.js";
