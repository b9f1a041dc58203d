-- Distribute spatialdb's schema with Citus, on the coordinator, after the migrations
-- (`spatialdb db upgrade --citus`). One transaction; running it again changes nothing.
--
-- Layout: every table keyed by slide is hash-distributed by slide_id, all co-located with
-- nucleus, so that a slide's objects, features and embeddings live on one worker and every
-- per-slide query (each one filters every table by slide_id) runs there whole. The small
-- catalog tables are reference tables, copied to every worker.
--
-- What Citus needs, checked against the schema:
-- * Primary and unique keys of distributed tables include slide_id: object tables
--   (slide_id, id), gland_feature (slide_id, gland_id), slide_feature and
--   slide_spatial_feature (slide_id), nucleus_density (slide_id, gx, gy, class),
--   slide_embedding (slide_id, encoder_sha256), slide_prediction (slide_id, model_sha256).
-- * Foreign keys: distributed -> reference (slide, run) are allowed, ON DELETE CASCADE and
--   SET NULL included (SET NULL only on slide_embedding.source_run_id, which does not hold the
--   distribution column); reference -> reference (run -> slide, run -> model,
--   slide.current_run_id -> run) too; there is no key from a reference table to a distributed
--   one. The keys are dropped while the tables are converted and added back after.
-- * Object tables are one table each here, not one partition per slide: Citus gives every
--   partition of a distributed table citus.shard_count shards of its own, so that layout grew by
--   128 shards (about 950 relations on the workers) per slide (benchmarks/scale.py). Each object
--   table is rewritten as a plain table with the same columns, keys and indexes, and loses its
--   keys to slide and run: a load writes its objects before its slide and run rows (an upsert on
--   a reference table would make concurrent loaders wait for each other), and one transaction
--   writes both (spatialdb/store/loader.py); deletes remove the objects themselves.
SET LOCAL citus.multi_shard_modify_mode TO 'sequential';

DO $$
DECLARE
    reference_tables text[] := ARRAY['model', 'slide', 'run', 'object_class'];
    object_tables text[] := ARRAY['nucleus', 'gland', 'lumen', 'tissue_region'];
    slide_tables text[] := object_tables
        || ARRAY['gland_feature', 'slide_feature', 'slide_spatial_feature', 'slide_embedding',
                 'slide_prediction', 'nucleus_density'];
    all_tables regclass[];
    foreign_keys text[];
    fk text;
    t text;
    p record;
    f record;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION 'the citus extension is not installed in this database';
    END IF;
    SELECT array_agg(name::regclass) INTO all_tables
    FROM unnest(reference_tables || slide_tables) name;

    -- Foreign keys between these tables, set aside while the tables change kind.
    SELECT coalesce(array_agg(format('ALTER TABLE %s ADD CONSTRAINT %I %s',
                                     conrelid::regclass, conname, pg_get_constraintdef(oid))), '{}')
    INTO foreign_keys
    FROM pg_constraint
    WHERE contype = 'f' AND conparentid = 0 AND conrelid = ANY (all_tables)
      AND conrelid <> ALL (SELECT unnest(object_tables)::regclass);
    FOR t, fk IN
        SELECT conrelid::regclass::text, conname FROM pg_constraint
        WHERE contype = 'f' AND conparentid = 0 AND conrelid = ANY (all_tables)
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', t, fk);
    END LOOP;

    -- Object tables partitioned by slide become one plain table each (their keys to slide and
    -- run, dropped above, are not added back).
    FOREACH t IN ARRAY object_tables LOOP
        IF (SELECT relkind FROM pg_class WHERE oid = t::regclass) = 'p' THEN
            EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING ALL)', t || '_plain', t);
            EXECUTE format('INSERT INTO %I SELECT * FROM %I', t || '_plain', t);
            EXECUTE format('DROP TABLE %I', t);
            EXECUTE format('ALTER TABLE %I RENAME TO %I', t || '_plain', t);
            FOR p IN SELECT indexrelid::regclass::text AS name FROM pg_index
                     WHERE indrelid = t::regclass
            LOOP
                EXECUTE format('ALTER INDEX %I RENAME TO %I', p.name,
                               regexp_replace(p.name, '^' || t || '_plain', t));
            END LOOP;
        END IF;
    END LOOP;

    FOREACH t IN ARRAY reference_tables LOOP
        IF NOT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = t::regclass) THEN
            PERFORM create_reference_table(t);
        END IF;
    END LOOP;
    FOREACH t IN ARRAY slide_tables LOOP
        IF NOT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = t::regclass) THEN
            PERFORM create_distributed_table(t, 'slide_id',
                colocate_with => CASE WHEN t = 'nucleus' THEN 'default' ELSE 'nucleus' END);
        END IF;
    END LOOP;

    FOREACH fk IN ARRAY foreign_keys LOOP
        EXECUTE fk;
    END LOOP;

    -- The feature functions become PL/pgSQL with the same body: Citus cannot plan the body of
    -- an SQL function that takes parameters, but plans each PL/pgSQL query with its values, as
    -- a router query on the slide's worker.
    FOR f IN
        SELECT fn.oid, fn.proname, fn.prosrc FROM pg_proc fn JOIN pg_language l ON l.oid = fn.prolang
        WHERE fn.pronamespace = 'public'::regnamespace AND l.lanname = 'sql'
          AND fn.proname = ANY (ARRAY['gland_features', 'slide_features', 'nucleus_features'])
    LOOP
        EXECUTE format('CREATE OR REPLACE FUNCTION %I(%s) RETURNS %s LANGUAGE plpgsql STABLE AS %L',
            f.proname, pg_get_function_arguments(f.oid), pg_get_function_result(f.oid),
            E'#variable_conflict use_column\nBEGIN\nRETURN QUERY\n'
            || rtrim(f.prosrc, E' \n;') || E';\nEND');
    END LOOP;
END
$$;
