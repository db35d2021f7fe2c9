// A TCP proxy on 127.0.0.1 in front of the server, so a test can cut every
// connection through it at once: a network loss as both ends see it.

import net from "node:net";

export async function startProxy(targetPort, targetHost = "127.0.0.1") {
  const pairs = new Set();
  const server = net.createServer((inbound) => {
    const outbound = net.connect(targetPort, targetHost);
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
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  return {
    port: server.address().port,
    get connections() {
      return pairs.size;
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
