// A TCP proxy on 127.0.0.1 in front of the server, so a test can cut every
// connection through it at once: a network loss as both ends see it.
// With {refuseUpgrade: true} it is a proxy that refuses WebSockets: a request
// asking for `Upgrade: websocket` is answered 403 and its connection closed.

import net from "node:net";

const UPGRADE = /\r\nupgrade:\s*websocket/i;

export async function startProxy(targetPort, targetHost = "127.0.0.1", { refuseUpgrade = false } = {}) {
  const pairs = new Set();
  let refused = 0;
  const server = net.createServer((inbound) => {
    if (refuseUpgrade) {
      // look at each request head before it goes on (one head per chunk is enough on loopback)
      inbound.once("data", function check(chunk) {
        if (UPGRADE.test(chunk.toString("latin1"))) {
          refused += 1;
          inbound.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
          return;
        }
        connectPair(inbound, chunk);
      });
      return;
    }
    connectPair(inbound, null);
  });
  function connectPair(inbound, first) {
    const outbound = net.connect(targetPort, targetHost);
    if (first) outbound.write(first);
    const pair = { inbound, outbound };
    pairs.add(pair);
    const end = () => {
      inbound.destroy();
      outbound.destroy();
      pairs.delete(pair);
    };
    inbound.on("error", end).on("close", end);
    outbound.on("error", end).on("close", end);
    inbound.pipe(outbound);
    outbound.pipe(inbound);
  }
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  return {
    port: server.address().port,
    get connections() {
      return pairs.size;
    },
    /** WebSocket upgrades refused (with refuseUpgrade). */
    get refused() {
      return refused;
    },
    /** Reset every connection through the proxy (TCP RST both ways). */
    dropAll() {
      const n = pairs.size;
      for (const { inbound, outbound } of [...pairs]) {
        inbound.resetAndDestroy();
        outbound.resetAndDestroy();
      }
      pairs.clear();
      return n;
    },
    close() {
      for (const { inbound, outbound } of pairs) {
        inbound.destroy();
        outbound.destroy();
      }
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
