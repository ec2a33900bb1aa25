// The TypeScript twin of examples/hello.py. With the daemon up:
//   npx tsc -p examples && node examples/dist/hello.js
import { Sandbox } from "podflare";

await using s = await Sandbox.create();
await s.runCode("x = 42; import json");
const r2 = await s.runCode("print(x, json.dumps({'ok': True}))");
console.log(r2.stdout); // 42 {"ok": true}
