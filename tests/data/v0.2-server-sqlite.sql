BEGIN TRANSACTION;
CREATE TABLE item (id INTEGER PRIMARY KEY, owner_id INTEGER NOT NULL, name VARCHAR(40) NOT NULL, qty INTEGER NOT NULL, syncunit_version INTEGER, syncunit_created_at TEXT, syncunit_updated_at TEXT);
INSERT INTO "item" VALUES(1,1,'gauze',5,1,'2026-12-06T01:17:03.730Z','2026-12-06T01:17:03.730Z');
INSERT INTO "item" VALUES(2,1,'tape',3,1,'2026-12-06T01:17:03.730Z','2026-12-06T01:17:03.730Z');
INSERT INTO "item" VALUES(3,2,'gloves',1,1,'2026-12-06T01:17:03.730Z','2026-12-06T01:17:03.730Z');
INSERT INTO "item" VALUES(4,3,'masks',2,1,'2026-12-06T01:17:03.730Z','2026-12-06T01:17:03.730Z');
INSERT INTO "item" VALUES(5,2,'swabs',7,4,'2026-12-06T01:17:03.869Z','2026-12-06T01:17:03.869Z');
CREATE TABLE owner (id INTEGER PRIMARY KEY, name VARCHAR(40) NOT NULL, region VARCHAR(20) NOT NULL, syncunit_version INTEGER, syncunit_created_at TEXT, syncunit_updated_at TEXT);
INSERT INTO "owner" VALUES(1,'Ana','north',2,'2026-12-06T01:17:03.731Z','2026-12-06T01:17:03.731Z');
INSERT INTO "owner" VALUES(2,'Rui','south',3,'2026-12-06T01:17:03.731Z','2026-12-06T01:17:03.868Z');
INSERT INTO "owner" VALUES(3,'Eva','south',2,'2026-12-06T01:17:03.731Z','2026-12-06T01:17:03.731Z');
CREATE TABLE syncunit_clients (
	client_id VARCHAR NOT NULL, 
	principal VARCHAR NOT NULL, 
	last_seq BIGINT NOT NULL, 
	last_seen VARCHAR, 
	PRIMARY KEY (client_id)
);
CREATE TABLE syncunit_clock (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
INSERT INTO "syncunit_clock" VALUES(1,4);
CREATE TABLE syncunit_meta (
	"key" VARCHAR NOT NULL, 
	value VARCHAR NOT NULL, 
	PRIMARY KEY ("key")
);
INSERT INTO "syncunit_meta" VALUES('epoch','2ba13b053607393b');
INSERT INTO "syncunit_meta" VALUES('schema-version','2');
INSERT INTO "syncunit_meta" VALUES('tracking:item','{"columns": {"id": 0, "owner_id": 0}, "format": "sqlite/2", "hash": "9358c92342243326", "key": ["id"], "uniques": []}');
INSERT INTO "syncunit_meta" VALUES('tracking:owner','{"columns": {"id": 0, "region": 0}, "format": "sqlite/2", "hash": "6499a468e06ddf93", "key": ["id"], "uniques": []}');
INSERT INTO "syncunit_meta" VALUES('cursor-key','fc2fe238bc181124c7f3c872a080eaa6b7a057683ba8ba5bc5a99d503d499d88');
INSERT INTO "syncunit_meta" VALUES('horizon','0');
CREATE TABLE syncunit_mutations (
	client_id VARCHAR NOT NULL, 
	seq BIGINT NOT NULL, 
	mutation_id VARCHAR NOT NULL, 
	result BLOB NOT NULL, 
	PRIMARY KEY (client_id, seq)
);
CREATE TABLE syncunit_replaced (table_name TEXT NOT NULL, kind TEXT NOT NULL, old TEXT NOT NULL);
CREATE TABLE syncunit_tombstones (
	id INTEGER NOT NULL, 
	table_name VARCHAR NOT NULL, 
	version BIGINT NOT NULL, 
	kind VARCHAR NOT NULL, 
	old TEXT NOT NULL, 
	at VARCHAR NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "syncunit_tombstones" VALUES(1,'owner',3,'move','{"id":2,"region":"north"}','2026-12-06T01:17:03.868Z');
CREATE INDEX ix_syncunit_tombstones_table_version ON syncunit_tombstones (table_name, version);
CREATE INDEX ix_syncunit_tombstones_at ON syncunit_tombstones (at);
CREATE INDEX ix_item_syncunit_version ON item (syncunit_version);
CREATE TRIGGER syncunit_item_bi BEFORE INSERT ON item BEGIN DELETE FROM syncunit_replaced WHERE table_name = 'item'; INSERT INTO syncunit_replaced (table_name, kind, old) SELECT 'item', 'delete', json_object('id', item.id, 'owner_id', item.owner_id) FROM item WHERE (item.id = NEW.id); END;
CREATE TRIGGER syncunit_item_ai AFTER INSERT ON item BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; UPDATE syncunit_replaced SET kind = 'move' WHERE table_name = 'item' AND json_extract(old, '$.id') IS NEW.id; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) SELECT 'item', (SELECT version FROM syncunit_clock WHERE id = 1), kind, old, strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM syncunit_replaced WHERE table_name = 'item'; DELETE FROM syncunit_replaced WHERE table_name = 'item'; UPDATE item SET syncunit_version = (SELECT version FROM syncunit_clock WHERE id = 1), syncunit_updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), syncunit_created_at = COALESCE(NEW.syncunit_created_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) WHERE item.id = NEW.id; END;
CREATE TRIGGER syncunit_item_bu BEFORE UPDATE ON item WHEN NOT (NEW.syncunit_version IS NOT OLD.syncunit_version AND NEW.syncunit_version IS (SELECT version FROM syncunit_clock WHERE id = 1)) BEGIN DELETE FROM syncunit_replaced WHERE table_name = 'item'; INSERT INTO syncunit_replaced (table_name, kind, old) SELECT 'item', 'delete', json_object('id', item.id, 'owner_id', item.owner_id) FROM item WHERE ((item.id = NEW.id)) AND NOT (item.id = OLD.id); END;
CREATE TRIGGER syncunit_item_au AFTER UPDATE ON item WHEN NOT (NEW.syncunit_version IS NOT OLD.syncunit_version AND NEW.syncunit_version IS (SELECT version FROM syncunit_clock WHERE id = 1)) BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) SELECT 'item', (SELECT version FROM syncunit_clock WHERE id = 1), kind, old, strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM syncunit_replaced WHERE table_name = 'item'; DELETE FROM syncunit_replaced WHERE table_name = 'item'; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) SELECT 'item', (SELECT version FROM syncunit_clock WHERE id = 1), 'move', json_object('id', OLD.id, 'owner_id', OLD.owner_id), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE OLD.id IS NOT NEW.id OR OLD.owner_id IS NOT NEW.owner_id; UPDATE item SET syncunit_version = (SELECT version FROM syncunit_clock WHERE id = 1), syncunit_updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE item.id = NEW.id; END;
CREATE TRIGGER syncunit_item_ad AFTER DELETE ON item BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) VALUES ('item', (SELECT version FROM syncunit_clock WHERE id = 1), 'delete', json_object('id', OLD.id, 'owner_id', OLD.owner_id), strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
CREATE INDEX ix_owner_syncunit_version ON owner (syncunit_version);
CREATE TRIGGER syncunit_owner_bi BEFORE INSERT ON owner BEGIN DELETE FROM syncunit_replaced WHERE table_name = 'owner'; INSERT INTO syncunit_replaced (table_name, kind, old) SELECT 'owner', 'delete', json_object('id', owner.id, 'region', owner.region) FROM owner WHERE (owner.id = NEW.id); END;
CREATE TRIGGER syncunit_owner_ai AFTER INSERT ON owner BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; UPDATE syncunit_replaced SET kind = 'move' WHERE table_name = 'owner' AND json_extract(old, '$.id') IS NEW.id; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) SELECT 'owner', (SELECT version FROM syncunit_clock WHERE id = 1), kind, old, strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM syncunit_replaced WHERE table_name = 'owner'; DELETE FROM syncunit_replaced WHERE table_name = 'owner'; UPDATE owner SET syncunit_version = (SELECT version FROM syncunit_clock WHERE id = 1), syncunit_updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), syncunit_created_at = COALESCE(NEW.syncunit_created_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) WHERE owner.id = NEW.id; END;
CREATE TRIGGER syncunit_owner_bu BEFORE UPDATE ON owner WHEN NOT (NEW.syncunit_version IS NOT OLD.syncunit_version AND NEW.syncunit_version IS (SELECT version FROM syncunit_clock WHERE id = 1)) BEGIN DELETE FROM syncunit_replaced WHERE table_name = 'owner'; INSERT INTO syncunit_replaced (table_name, kind, old) SELECT 'owner', 'delete', json_object('id', owner.id, 'region', owner.region) FROM owner WHERE ((owner.id = NEW.id)) AND NOT (owner.id = OLD.id); END;
CREATE TRIGGER syncunit_owner_au AFTER UPDATE ON owner WHEN NOT (NEW.syncunit_version IS NOT OLD.syncunit_version AND NEW.syncunit_version IS (SELECT version FROM syncunit_clock WHERE id = 1)) BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) SELECT 'owner', (SELECT version FROM syncunit_clock WHERE id = 1), kind, old, strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM syncunit_replaced WHERE table_name = 'owner'; DELETE FROM syncunit_replaced WHERE table_name = 'owner'; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) SELECT 'owner', (SELECT version FROM syncunit_clock WHERE id = 1), 'move', json_object('id', OLD.id, 'region', OLD.region), strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE OLD.id IS NOT NEW.id OR OLD.region IS NOT NEW.region; UPDATE owner SET syncunit_version = (SELECT version FROM syncunit_clock WHERE id = 1), syncunit_updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE owner.id = NEW.id; END;
CREATE TRIGGER syncunit_owner_ad AFTER DELETE ON owner BEGIN UPDATE syncunit_clock SET version = version + 1 WHERE id = 1; INSERT INTO syncunit_tombstones (table_name, version, kind, old, at) VALUES ('owner', (SELECT version FROM syncunit_clock WHERE id = 1), 'delete', json_object('id', OLD.id, 'region', OLD.region), strftime('%Y-%m-%dT%H:%M:%fZ', 'now')); END;
CREATE INDEX ix_item_owner_id_syncunit_version ON item (owner_id, syncunit_version);
CREATE INDEX ix_syncunit_tombstones_old_id ON syncunit_tombstones (json_extract(old, '$.id'), version);
CREATE INDEX ix_syncunit_tombstones_old_owner_id ON syncunit_tombstones (json_extract(old, '$.owner_id'), version);
CREATE INDEX ix_syncunit_tombstones_old_region ON syncunit_tombstones (json_extract(old, '$.region'), version);
COMMIT;
