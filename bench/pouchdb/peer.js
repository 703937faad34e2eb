// The PouchDB peer of the syncunit bench, two roles in separate processes:
//   node peer.js serve PORT             a CouchDB-protocol server (express-pouchdb, memory adapter)
//   node peer.js replicate URL DIR      a device: PouchDB on LevelDB in DIR pulls URL once,
//                                       and prints {"docs_written", "seconds", "docs"} as JSON
"use strict";

const PouchDB = require("pouchdb");

function serve(port) {
  const express = require("express");
  const MemPouch = PouchDB.plugin(require("pouchdb-adapter-memory")).defaults({
    adapter: "memory",
  });
  const app = express();
  app.use("/", require("express-pouchdb")(MemPouch, { mode: "minimumForPouchDB", logPath: "/dev/null" }));
  app.listen(port, "127.0.0.1", () => console.log(`listening on ${port}`));
}

async function replicate(url, dir, batchSize) {
  const local = new PouchDB(dir); // LevelDB: the device's database on disk
  const started = process.hrtime.bigint();
  const info = await local.replicate.from(url, { batch_size: batchSize, batches_limit: 4 });
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  const docs = (await local.info()).doc_count;
  await local.close();
  console.log(JSON.stringify({ docs_written: info.docs_written, seconds, docs }));
}

const [role, a, b, c] = process.argv.slice(2);
if (role === "serve") {
  serve(Number(a));
} else if (role === "replicate") {
  replicate(a, b, Number(c || 1000)).catch((err) => {
    console.error(err);
    process.exit(1);
  });
} else {
  console.error("usage: node peer.js serve PORT | replicate URL DIR [BATCH_SIZE]");
  process.exit(2);
}
