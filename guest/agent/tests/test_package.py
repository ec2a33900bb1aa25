"""The agent as a package: how it is started, what each process imports, what the image holds.

Run: cd guest/agent && python3 -m unittest tests.test_package -v
"""

import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from frames import AGENT, AgentProcess  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(HERE, "..", "..", "packages", "daemon", "src", "image", "recipe.ts")
CONTROL_ONLY = {"podflare_agent.scheduler", "podflare_agent.supervisor", "podflare_agent.files", "podflare_agent.identity", "podflare_agent.dispatch"}


class PackageTests(unittest.TestCase):
    def test_started_as_a_directory_or_as_a_module(self):
        for argv, cwd in (([AGENT, "--help"], "/"), (["-m", "podflare_agent", "--help"], HERE)):
            result = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=30)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("usage: podflare_agent", result.stdout)
            self.assertIn("--skip-system-restore", result.stdout)

    def test_importing_a_module_starts_nothing(self):
        code = "import podflare_agent.__main__, podflare_agent.dispatch, podflare_agent.worker, threading; print(threading.active_count())"
        result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=30)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "1\n", ""))

    def test_the_worker_imports_none_of_the_control_process_modules(self):
        agent = AgentProcess()
        try:
            agent.channel.send({"type": "exec", "id": 1, "language": "python", "timeout_ms": None, "max_output_bytes": None}, b"import sys\nprint(sorted(m for m in sys.modules if m.startswith('podflare_agent')))\nprint(sys.path[0] == '')")
            out = ""
            while True:
                header, payload = agent.channel.recv()
                if header["type"] == "exit":
                    break
                out += payload.decode()
            self.assertEqual(header["code"], 0, out)
            loaded, path0 = out.splitlines()
            self.assertEqual(set(eval(loaded)) & CONTROL_ONLY, set())  # noqa: S307 (our own repr)
            self.assertIn("podflare_agent.worker", loaded)
            self.assertEqual(path0, "True")  # user code's sys.path[0] is "", as in the interactive interpreter
        finally:
            self.assertEqual(agent.close(), 0)

    def test_the_image_recipe_lists_every_module(self):
        with open(RECIPE, encoding="utf-8") as f:
            listed = set(re.findall(r'"agent/podflare_agent/([^"]+)"', f.read()))
        modules = {name for name in os.listdir(AGENT) if name.endswith(".py")}
        self.assertEqual(listed, modules)


if __name__ == "__main__":
    unittest.main()
