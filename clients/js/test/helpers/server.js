// Start the real Python server as a child process on 127.0.0.1 (port 0) for tests.
//
// The Python is $WSSERVER_PYTHON, else the repository's .venv/bin/python
// (what .ci/run creates). The server prints "listening on ws://HOST:PORT/".

import { spawn } from "node:child_process";
import { after, before } from "node:test";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../..");

export function pythonPath() {
  return process.env.WSSERVER_PYTHON || path.join(repoRoot, ".venv/bin/python");
}

/**
 * @param {string[]} [extraArgs] more `wsserver serve` flags
 * @returns {Promise<{url: string, httpUrl: string, port: number, output: () => string, stop: () => Promise<void>}>}
 */
export async function startServer(extraArgs = []) {
  const python = pythonPath();
  if (!existsSync(python)) {
    throw new Error(
      `no Python for the server at ${python}: set WSSERVER_PYTHON (e.g. to a venv's python with wsserver installed)`,
    );
  }
  const args = [
    "-m", "wsserver", "serve",
    "--host", "127.0.0.1", "--port", "0",
    "--sim-tokens-per-s", "0", "--sim-ttft-ms", "0", "--ping-interval", "0",
    "--log-level", "warning",
    ...extraArgs,
  ];
  const child = spawn(python, args, { cwd: repoRoot, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout.setEncoding("utf8");
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (chunk) => (out += chunk));
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  // never leave a server behind, whatever happens to this test process
  const reap = () => child.kill("SIGKILL");
  process.once("exit", reap);
  exited.then(() => process.off("exit", reap));
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start in 20 s:\n${out}`)), 20_000);
    child.stdout.on("data", (chunk) => {
      out += chunk;
      const match = /listening on (ws:\/\/[^\s/]+\/)/.exec(out);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${code ?? signal}) before listening:\n${out}`));
    });
  });
  const port = Number(new URL(url).port);
  return {
    url,
    httpUrl: url.replace(/^ws:/, "http:"),
    port,
    output: () => out,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/**
 * A server for the calling file's tests: started before them, stopped after
 * them together with the clients the tests put into `clients`.
 */
export function useServer(extraArgs = []) {
  const fixture = { server: null, clients: [] };
  before(async () => {
    fixture.server = await startServer(extraArgs);
  });
  after(async () => {
    await Promise.all(fixture.clients.map((c) => c.close()));
    await fixture.server?.stop();
  });
  return fixture;
}
