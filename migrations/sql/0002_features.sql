-- Gland–nuclei features: tables filled by SQL, per slide, from the slide's current objects.
--
-- Units: µm and µm² through the slide's mpp (areas and perimeters as stored on the objects;
-- lengths and distances in level-0 pixels times sqrt(mpp_x * mpp_y)). "Inside a gland" means the
-- object's stored centroid lies inside the gland polygon. Every query filters every table by the
-- slide, so that the object tables can be distributed by slide_id (Citus) and stay shard-local.
--
-- From psql:  SELECT refresh_slide_features(1);  SELECT * FROM nucleus_features(1, 25);

CREATE TABLE gland_feature (
    slide_id integer NOT NULL,
    gland_id bigint NOT NULL,
    run_id integer NOT NULL,
    gland_uuid uuid NOT NULL,
    gland_class text NOT NULL,
    centroid_x_px double precision NOT NULL,
    centroid_y_px double precision NOT NULL,
    area_um2 double precision NOT NULL,
    perimeter_um double precision NOT NULL,
    circularity double precision NOT NULL,           -- 4π area / perimeter²: 1 for a disc
    solidity double precision NOT NULL,              -- area / convex hull area
    major_axis_um double precision NOT NULL,         -- maximum Feret diameter
    minor_axis_um double precision NOT NULL,         -- width perpendicular to that diameter
    elongation double precision NOT NULL,            -- major / minor axis
    nuclei_count integer NOT NULL,
    nuclei_per_1000um2 double precision NOT NULL,
    nuclear_area_mean_um2 double precision,          -- NULL when the gland holds no nucleus
    nuclear_area_median_um2 double precision,
    nuclei_by_class jsonb NOT NULL,                  -- {"epithelial": 41, ...}
    lumen_count integer NOT NULL,
    lumen_area_um2 double precision NOT NULL,
    lumen_to_gland_area_ratio double precision NOT NULL,
    nearest_gland_distance_um double precision,      -- boundary to boundary; NULL if it is alone
    tissue_class text,                               -- tissue region under the gland's centroid
    CONSTRAINT pk_gland_feature PRIMARY KEY (slide_id, gland_id),
    CONSTRAINT fk_gland_feature_slide_id_slide FOREIGN KEY (slide_id)
        REFERENCES slide (id) ON DELETE CASCADE,
    CONSTRAINT fk_gland_feature_run_id_run FOREIGN KEY (run_id) REFERENCES run (id) ON DELETE CASCADE
);

CREATE TABLE slide_feature (
    slide_id integer NOT NULL,
    run_id integer NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now(),
    tissue_area_um2 double precision NOT NULL,       -- sum of the tissue regions
    nucleus_count integer NOT NULL,
    gland_count integer NOT NULL,
    lumen_count integer NOT NULL,
    gland_area_um2 double precision NOT NULL,
    lumen_area_um2 double precision NOT NULL,
    gland_area_fraction double precision,            -- of tissue; NULL without tissue regions
    lumen_area_fraction double precision,
    stroma_area_um2 double precision,                -- tissue outside glands
    nuclei_in_glands integer NOT NULL,
    nuclei_in_stroma integer NOT NULL,               -- nuclei outside every gland
    nuclei_per_1000um2_in_glands double precision,
    nuclei_per_1000um2_in_stroma double precision,
    object_counts jsonb NOT NULL,                    -- {"nucleus": {"epithelial": 9120, ...}, ...}
    tissue_class_area_um2 jsonb NOT NULL,            -- {"stroma": 1.2e6, ...}
    gland_feature_quantiles jsonb NOT NULL,          -- {"area_um2": {"mean", "q05", ..., "q95"}}
    CONSTRAINT pk_slide_feature PRIMARY KEY (slide_id),
    CONSTRAINT fk_slide_feature_slide_id_slide FOREIGN KEY (slide_id)
        REFERENCES slide (id) ON DELETE CASCADE,
    CONSTRAINT fk_slide_feature_run_id_run FOREIGN KEY (run_id) REFERENCES run (id) ON DELETE CASCADE
);


-- Per-gland features of one slide; lane k of n computes the glands with id % n = k, so that
-- several connections can share a slide. Each measurement is a LATERAL subquery per gland:
-- the gland is the outer row, so PostGIS prepares its polygon once for all of its point tests.
CREATE FUNCTION gland_features(p_slide_id integer, p_lane integer DEFAULT 0, p_lanes integer DEFAULT 1)
RETURNS SETOF gland_feature
LANGUAGE sql STABLE PARALLEL SAFE AS $$
WITH
-- Tissue cut into pieces of at most 256 vertices: their small boxes make the centroid index
-- useful (a whole tissue multipolygon's box covers the slide).
tissue_piece AS MATERIALIZED (
    SELECT t.id, t.class, ST_Subdivide(t.geom, 256) AS geom
    FROM tissue_region t WHERE t.slide_id = p_slide_id
),
tissue AS (
    SELECT DISTINCT ON (g.id) g.id AS gland_id, p.class
    FROM tissue_piece p
    JOIN gland g ON g.slide_id = p_slide_id AND ST_Contains(p.geom, g.centroid)  -- GiST gland.centroid
    WHERE g.id % p_lanes = p_lane
    ORDER BY g.id, p.id
)
SELECT
    g.slide_id, g.id, g.run_id, g.uuid, g.class,
    ST_X(g.centroid), ST_Y(g.centroid),
    g.area_um2, g.perimeter_um,
    4 * pi() * g.area_um2 / (g.perimeter_um ^ 2),
    ST_Area(g.geom) / ST_Area(shape.hull),
    axes.major_um, axes.minor_um, axes.major_um / axes.minor_um,
    nuclei.n,
    1000 * nuclei.n / g.area_um2,
    nuclei.mean_area_um2,
    nuclei.median_area_um2,
    coalesce((SELECT jsonb_object_agg(c.class, c.n ORDER BY c.class)
              FROM (SELECT class, count(*) AS n FROM unnest(nuclei.classes) class GROUP BY class) c),
             '{}'),
    lumina.n,
    coalesce(lumina.area_um2, 0),
    coalesce(lumina.area_um2, 0) / g.area_um2,
    nearest.distance_px * s.mpp,
    tissue.class
FROM gland g
CROSS JOIN (SELECT mpp_x, mpp_y, sqrt(mpp_x * mpp_y) AS mpp FROM slide WHERE id = p_slide_id) s
-- Nuclei whose centroid is inside: GiST nucleus.centroid inside the gland's box, then the
-- point-in-polygon test.
CROSS JOIN LATERAL (
    SELECT count(*)::integer AS n, avg(n.area_um2) AS mean_area_um2,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY n.area_um2) AS median_area_um2,
           array_agg(n.class) AS classes
    FROM nucleus n
    WHERE n.slide_id = p_slide_id AND ST_Contains(g.geom, n.centroid)
) nuclei
CROSS JOIN LATERAL (
    SELECT count(*)::integer AS n, sum(l.area_um2) AS area_um2
    FROM lumen l
    WHERE l.slide_id = p_slide_id AND ST_Contains(g.geom, l.centroid)  -- GiST lumen.centroid
) lumina
-- Nearest other gland: KNN on the GiST geom index; <-> in ORDER BY is the exact distance.
LEFT JOIN LATERAL (
    SELECT g.geom <-> o.geom AS distance_px
    FROM gland o
    WHERE o.slide_id = p_slide_id AND o.id <> g.id
    ORDER BY g.geom <-> o.geom
    LIMIT 1
) nearest ON true
-- Axes: the maximum Feret diameter (the hull's longest chord, in µm) and the hull's extent
-- across it, read off the hull turned so that the diameter lies along x. Exact for ellipses and
-- independent of the GEOS version (ST_OrientedEnvelope changed its rectangle in GEOS 3.12).
-- OFFSET 0 keeps each shape computed once per gland instead of once per use.
CROSS JOIN LATERAL (SELECT ST_ConvexHull(g.geom) AS hull OFFSET 0) shape
CROSS JOIN LATERAL (SELECT ST_Scale(shape.hull, s.mpp_x, s.mpp_y) AS hull_um OFFSET 0) scaled
CROSS JOIN LATERAL (SELECT ST_LongestLine(scaled.hull_um, scaled.hull_um) AS chord OFFSET 0) feret
CROSS JOIN LATERAL (
    SELECT ST_Rotate(scaled.hull_um, -atan2(
               ST_Y(ST_EndPoint(feret.chord)) - ST_Y(ST_StartPoint(feret.chord)),
               ST_X(ST_EndPoint(feret.chord)) - ST_X(ST_StartPoint(feret.chord)))) AS turned
    OFFSET 0
) along
CROSS JOIN LATERAL (
    SELECT ST_XMax(along.turned) - ST_XMin(along.turned) AS major_um,
           ST_YMax(along.turned) - ST_YMin(along.turned) AS minor_um
) axes
LEFT JOIN tissue ON tissue.gland_id = g.id
WHERE g.slide_id = p_slide_id AND g.id % p_lanes = p_lane
$$;


-- Per-slide features, from the slide's objects and its gland_feature rows (refresh those first).
CREATE FUNCTION slide_features(p_slide_id integer)
RETURNS SETOF slide_feature
LANGUAGE sql STABLE PARALLEL SAFE AS $$
WITH
class_counts AS (
    SELECT 'nucleus' AS object, class, count(*) AS n FROM nucleus WHERE slide_id = p_slide_id GROUP BY class
    UNION ALL
    SELECT 'gland', class, count(*) FROM gland WHERE slide_id = p_slide_id GROUP BY class
    UNION ALL
    SELECT 'lumen', class, count(*) FROM lumen WHERE slide_id = p_slide_id GROUP BY class
    UNION ALL
    SELECT 'tissue_region', class, count(*) FROM tissue_region WHERE slide_id = p_slide_id GROUP BY class
),
objects AS (
    SELECT coalesce(jsonb_object_agg(object, classes ORDER BY object), '{}') AS counts,
           coalesce(sum(total) FILTER (WHERE object = 'nucleus'), 0) AS nuclei,
           coalesce(sum(total) FILTER (WHERE object = 'lumen'), 0) AS lumina
    FROM (SELECT object, jsonb_object_agg(class, n ORDER BY class) AS classes, sum(n) AS total
          FROM class_counts GROUP BY object) o
),
tissue AS (
    SELECT coalesce(sum(area_um2), 0) AS area_um2,
           coalesce(jsonb_object_agg(class, area_um2 ORDER BY class), '{}') AS by_class
    FROM (SELECT class, sum(area_um2) AS area_um2 FROM tissue_region
          WHERE slide_id = p_slide_id GROUP BY class) t
),
lumina AS (
    SELECT coalesce(sum(area_um2), 0) AS area_um2 FROM lumen WHERE slide_id = p_slide_id
),
glands AS (
    SELECT count(*) AS n, coalesce(sum(area_um2), 0) AS area_um2,
           coalesce(sum(nuclei_count), 0) AS nuclei
    FROM gland_feature WHERE slide_id = p_slide_id
),
quantiles AS (
    SELECT coalesce(jsonb_object_agg(name, jsonb_build_object(
               'mean', mean, 'q05', q[1], 'q25', q[2], 'q50', q[3], 'q75', q[4], 'q95', q[5])
               ORDER BY name), '{}') AS by_feature
    FROM (
        SELECT v.name, avg(v.value) AS mean,
               percentile_cont(ARRAY[0.05, 0.25, 0.5, 0.75, 0.95]) WITHIN GROUP (ORDER BY v.value) AS q
        FROM gland_feature f
        CROSS JOIN LATERAL (VALUES
            ('area_um2', f.area_um2), ('perimeter_um', f.perimeter_um),
            ('circularity', f.circularity), ('solidity', f.solidity),
            ('major_axis_um', f.major_axis_um), ('minor_axis_um', f.minor_axis_um),
            ('elongation', f.elongation), ('nuclei_count', f.nuclei_count::double precision),
            ('nuclei_per_1000um2', f.nuclei_per_1000um2),
            ('nuclear_area_mean_um2', f.nuclear_area_mean_um2),
            ('lumen_count', f.lumen_count::double precision),
            ('lumen_to_gland_area_ratio', f.lumen_to_gland_area_ratio),
            ('nearest_gland_distance_um', f.nearest_gland_distance_um)
        ) v(name, value)
        WHERE f.slide_id = p_slide_id AND v.value IS NOT NULL
        GROUP BY v.name
    ) stats
),
stroma AS (
    SELECT CASE WHEN tissue.area_um2 > 0 THEN greatest(tissue.area_um2 - glands.area_um2, 0) END
               AS area_um2
    FROM tissue, glands
)
SELECT
    s.id, s.current_run_id, now(),
    tissue.area_um2,
    objects.nuclei::integer, glands.n::integer, objects.lumina::integer,
    glands.area_um2, lumina.area_um2,
    glands.area_um2 / nullif(tissue.area_um2, 0),
    lumina.area_um2 / nullif(tissue.area_um2, 0),
    stroma.area_um2,
    glands.nuclei::integer, (objects.nuclei - glands.nuclei)::integer,
    1000 * glands.nuclei / nullif(glands.area_um2, 0),
    1000 * (objects.nuclei - glands.nuclei) / nullif(stroma.area_um2, 0),
    objects.counts, tissue.by_class, quantiles.by_feature
FROM slide s, objects, tissue, lumina, glands, quantiles, stroma
WHERE s.id = p_slide_id AND s.current_run_id IS NOT NULL
$$;


-- Recompute a slide's features in one transaction (one connection; `spatialdb features refresh`
-- does the same with several connections sharing the glands). The slide row lock serialises it
-- with loaders and deletes of that slide.
CREATE FUNCTION refresh_slide_features(p_slide_id integer)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM slide WHERE id = p_slide_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no slide with id %', p_slide_id USING ERRCODE = 'no_data_found';
    END IF;
    DELETE FROM gland_feature WHERE slide_id = p_slide_id;
    DELETE FROM slide_feature WHERE slide_id = p_slide_id;
    INSERT INTO gland_feature SELECT * FROM gland_features(p_slide_id);
    INSERT INTO slide_feature SELECT * FROM slide_features(p_slide_id);
END
$$;


-- Per-nucleus features, on demand: containing gland (or NULL), distance to the nearest gland
-- boundary (inside or out), tissue class under the centroid, and the number of other nuclei whose
-- centroid lies within p_radius_um of its centroid.
CREATE FUNCTION nucleus_features(p_slide_id integer, p_radius_um double precision DEFAULT 25)
RETURNS TABLE (
    slide_id integer, run_id integer, nucleus_id bigint, nucleus_uuid uuid, nucleus_class text,
    centroid_x_px double precision, centroid_y_px double precision,
    area_um2 double precision, perimeter_um double precision,
    gland_id bigint, distance_to_gland_boundary_um double precision, tissue_class text,
    neighbours_within_radius integer, radius_um double precision
)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
WITH
s AS (SELECT sqrt(mpp_x * mpp_y) AS mpp FROM slide WHERE id = p_slide_id),
tissue_piece AS MATERIALIZED (
    SELECT t.id, t.class, ST_Subdivide(t.geom, 256) AS geom
    FROM tissue_region t WHERE t.slide_id = p_slide_id
),
tissue AS (
    SELECT DISTINCT ON (n.id) n.id AS nucleus_id, p.class
    FROM tissue_piece p
    JOIN nucleus n ON n.slide_id = p_slide_id AND ST_Contains(p.geom, n.centroid)
    ORDER BY n.id, p.id
),
-- Gland first, then the nuclei inside it: one prepared polygon and one boundary per gland.
inside AS (
    SELECT i.id AS nucleus_id, g.id AS gland_id, ST_Distance(b.boundary, i.centroid) AS distance_px
    FROM gland g
    CROSS JOIN LATERAL (SELECT ST_Boundary(g.geom) AS boundary OFFSET 0) b
    CROSS JOIN LATERAL (
        SELECT n.id, n.centroid FROM nucleus n
        WHERE n.slide_id = p_slide_id AND ST_Contains(g.geom, n.centroid) OFFSET 0
    ) i
    WHERE g.slide_id = p_slide_id
)
SELECT
    n.slide_id, n.run_id, n.id, n.uuid, n.class, ST_X(n.centroid), ST_Y(n.centroid),
    n.area_um2, n.perimeter_um,
    inside.gland_id,
    coalesce(inside.distance_px, outside.distance_px) * s.mpp,
    tissue.class,
    neighbours.n, p_radius_um
FROM nucleus n
CROSS JOIN s
LEFT JOIN inside ON inside.nucleus_id = n.id
LEFT JOIN tissue ON tissue.nucleus_id = n.id
-- Outside every gland: KNN to the nearest gland (exact distance to its boundary).
LEFT JOIN LATERAL (
    SELECT g.geom <-> n.centroid AS distance_px FROM gland g
    WHERE g.slide_id = p_slide_id AND inside.nucleus_id IS NULL
    ORDER BY g.geom <-> n.centroid LIMIT 1
) outside ON true
-- Neighbours: GiST nucleus.centroid within the radius (ST_DWithin expands the box).
CROSS JOIN LATERAL (
    SELECT count(*)::integer AS n FROM nucleus m
    WHERE m.slide_id = p_slide_id AND m.id <> n.id
      AND ST_DWithin(m.centroid, n.centroid, p_radius_um / s.mpp)
) neighbours
WHERE n.slide_id = p_slide_id
$$;
