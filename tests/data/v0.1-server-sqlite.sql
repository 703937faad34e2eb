BEGIN TRANSACTION;
CREATE TABLE item (id INTEGER PRIMARY KEY, owner_id INTEGER NOT NULL, name VARCHAR(40) NOT NULL, qty INTEGER NOT NULL, syncunit_version INTEGER, syncunit_created_at TEXT, syncunit_updated_at TEXT);
INSERT INTO "item" VALUES(1,1,'gauze',5,3,'2026-12-05T22:14:54.355Z','2026-12-05T22:14:54.355Z');
INSERT INTO "item" VALUES(2,1,'tape',3,4,'2026-12-05T22:14:54.355Z','2026-12-05T22:14:54.355Z');
INSERT INTO "item" VALUES(4,2,'gloves',1,6,'2026-12-05T22:14:54.355Z','2026-12-05T22:14:54.355Z');
CREATE TABLE owner (id INTEGER PRIMARY KEY, name VARCHAR(40) NOT NULL, region VARCHAR(20) NOT NULL, syncunit_version INTEGER, syncunit_created_at TEXT, syncunit_updated_at TEXT);
INSERT INTO "owner" VALUES(1,'Ana','north',1,'2026-12-05T22:14:54.354Z','2026-12-05T22:14:54.354Z');
INSERT INTO "owner" VALUES(2,'Rui','south',2,'2026-12-05T22:14:54.354Z','2026-12-05T22:14:54.354Z');
CREATE TABLE syncunit_clients (
	client_id VARCHAR NOT NULL, 
	principal VARCHAR NOT NULL, 
	last_seq BIGINT NOT NULL, 
	last_seen VARCHAR, 
	PRIMARY KEY (client_id)
);
CREATE TABLE syncunit_clock (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT INTO "syncunit_clock" VALUES(1,7);
CREATE TABLE syncunit_meta (
	"key" VARCHAR NOT NULL, 
	value VARCHAR NOT NULL, 
	PRIMARY KEY ("key")
);
INSERT INTO "syncunit_meta" VALUES('epoch','9db15ce32c3fa819');
INSERT INTO "syncunit_meta" VALUES('horizon','0');
CREATE TABLE syncunit_mutations (
	client_id VARCHAR NOT NULL, 
	seq BIGINT NOT NULL, 
	mutation_id VARCHAR NOT NULL, 
	result BLOB NOT NULL, 
	PRIMARY KEY (client_id, seq)
);
CREATE TABLE syncunit_tombstones (
	id INTEGER NOT NULL, 
	table_name VARCHAR NOT NULL, 
	version BIGINT NOT NULL, 
	kind VARCHAR NOT NULL, 
	old TEXT NOT NULL, 
	at VARCHAR NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "syncunit_tombstones" VALUES(1,'item',7,'delete','{"id":3,"owner_id":1}','2026-12-05T22:14:54.355Z');
CREATE INDEX ix_syncunit_tombstones_table_version ON syncunit_tombstones (table_name, version);
CREATE INDEX ix_item_syncunit_version ON item (syncunit_version);
CREATE TRIGGER syncunit_item_bi BEFORE INSERT ON item WHEN EXISTS (SELECT 1 FROM item WHERE id = NEW.id) BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) SELECT 'item', (SELECT version FROM syncunit_clock WHERE id = 1), 'move', json_object('id', item.id, 'owner_id', item.owner_id), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM item WHERE id = NEW.id; END;
CREATE TRIGGER syncunit_item_ai AFTER INSERT ON item BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; UPDATE item SET syncunit_version = (SELECT version FROM syncunit_clock WHERE id = 1), syncunit_updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), syncunit_created_at = COALESCE(NEW.syncunit_created_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) WHERE id = NEW.id; END;
CREATE TRIGGER syncunit_item_au AFTER UPDATE ON item WHEN NEW.syncunit_version IS OLD.syncunit_version BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) SELECT 'item', (SELECT version FROM syncunit_clock WHERE id = 1), 'move', json_object('id', OLD.id, 'owner_id', OLD.owner_id), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE OLD.id IS NOT NEW.id OR OLD.owner_id IS NOT NEW.owner_id; UPDATE item SET syncunit_version = (SELECT version FROM syncunit_clock WHERE id = 1), syncunit_updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;
CREATE TRIGGER syncunit_item_ad AFTER DELETE ON item BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) VALUES ('item', (SELECT version FROM syncunit_clock WHERE id = 1), 'delete', json_object('id', OLD.id, 'owner_id', OLD.owner_id), strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
CREATE INDEX ix_owner_syncunit_version ON owner (syncunit_version);
CREATE TRIGGER syncunit_owner_bi BEFORE INSERT ON owner WHEN EXISTS (SELECT 1 FROM owner WHERE id = NEW.id) BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) SELECT 'owner', (SELECT version FROM syncunit_clock WHERE id = 1), 'move', json_object('id', owner.id, 'region', owner.region), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM owner WHERE id = NEW.id; END;
CREATE TRIGGER syncunit_owner_ai AFTER INSERT ON owner BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; UPDATE owner SET syncunit_version = (SELECT version FROM syncunit_clock WHERE id = 1), syncunit_updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), syncunit_created_at = COALESCE(NEW.syncunit_created_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) WHERE id = NEW.id; END;
CREATE TRIGGER syncunit_owner_au AFTER UPDATE ON owner WHEN NEW.syncunit_version IS OLD.syncunit_version BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) SELECT 'owner', (SELECT version FROM syncunit_clock WHERE id = 1), 'move', json_object('id', OLD.id, 'region', OLD.region), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE OLD.id IS NOT NEW.id OR OLD.region IS NOT NEW.region; UPDATE owner SET syncunit_version = (SELECT version FROM syncunit_clock WHERE id = 1), syncunit_updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;
CREATE TRIGGER syncunit_owner_ad AFTER DELETE ON owner BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) VALUES ('owner', (SELECT version FROM syncunit_clock WHERE id = 1), 'delete', json_object('id', OLD.id, 'region', OLD.region), strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
COMMIT;
