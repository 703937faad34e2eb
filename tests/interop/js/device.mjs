// A JavaScript device for the interop test: the real RxDB (memory storage, schema
// validation, dev-mode checks) replicating one stream, driven by JSON lines on
// stdin; each command answers one JSON line on stdout.
import { createInterface } from 'node:readline';
import { createRxDatabase, addRxPlugin } from 'rxdb';
import { getRxStorageMemory } from 'rxdb/plugins/storage-memory';
import { wrappedValidateAjvStorage } from 'rxdb/plugins/validate-ajv';
import { RxDBDevModePlugin, disableWarnings } from 'rxdb/plugins/dev-mode';
import { fetchSchema, replicateSyncunit } from './syncunit-rxdb.mjs';

disableWarnings();
addRxPlugin(RxDBDevModePlugin);

let db;
let collection;
let replication;
let options;
const results = [];
const errors = [];

function startReplication() {
  replication = replicateSyncunit({ collection, ...options, onResult: (r) => results.push(r) });
  replication.error$.subscribe((err) => errors.push(String(err && err.message ? err.message : err)));
}

async function settle() {
  await replication.reSync();
  await replication.awaitInSync();
}

const commands = {
  async start(cmd) {
    options = {
      url: cmd.url, unit: cmd.unit, stream: cmd.stream, token: cmd.token,
      clientId: cmd.clientId, batchSize: cmd.batchSize, params: cmd.params,
    };
    db = await createRxDatabase({
      name: cmd.name,
      storage: wrappedValidateAjvStorage({ storage: getRxStorageMemory() }),
    });
    const schema = await fetchSchema(options);
    await db.addCollections({ docs: { schema } });
    collection = db.docs;
    startReplication();
    await replication.awaitInitialReplication();
    return { count: (await collection.find().exec()).length };
  },
  async insert(cmd) {
    await collection.insert(cmd.doc);
    if (!replication.isPaused()) await replication.awaitInSync();
    return {};
  },
  async patch(cmd) {
    const doc = await collection.findOne(cmd.id).exec();
    await doc.incrementalPatch(cmd.fields);
    if (!replication.isPaused()) await replication.awaitInSync();
    return {};
  },
  async remove(cmd) {
    const doc = await collection.findOne(cmd.id).exec();
    await doc.remove();
    if (!replication.isPaused()) await replication.awaitInSync();
    return {};
  },
  async pause() {
    await replication.pause();
    return {};
  },
  async resume() {
    await replication.start();
    await settle();
    return {};
  },
  async sync() {
    await settle();
    return {};
  },
  async docs() {
    const all = await collection.find().exec();
    return { docs: all.map((d) => d.toMutableJSON(false)) };
  },
  async results() {
    return { results, errors };
  },
  async stop() {
    await replication.cancel();
    await db.close();
    return {};
  },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const cmd = JSON.parse(line);
  let answer;
  try {
    answer = { ok: true, ...(await commands[cmd.cmd](cmd)) };
  } catch (err) {
    answer = { ok: false, error: String(err && err.stack ? err.stack : err) };
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
  if (cmd.cmd === 'stop') break;
}
process.exit(0);
