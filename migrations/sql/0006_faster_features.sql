-- Faster bodies for two feature functions of 0002_features.sql, with the same signatures and
-- the same results: gland_features measures shape and the nearest gland with less work, and
-- slide_features summarises the per-gland features without sorting every value by name.
-- Units, scoping by slide and the other functions: see 0002_features.sql.

CREATE OR REPLACE FUNCTION gland_features(
    p_slide_id integer, p_lane integer DEFAULT 0, p_lanes integer DEFAULT 1
)
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
    -- GiST gland.centroid
    JOIN gland g ON g.slide_id = p_slide_id AND ST_Contains(p.geom, g.centroid)
    WHERE g.id % p_lanes = p_lane
    ORDER BY g.id, p.id
)
SELECT
    g.slide_id, g.id, g.run_id, g.uuid, g.class,
    ST_X(g.centroid), ST_Y(g.centroid),
    g.area_um2, g.perimeter_um,
    4 * pi() * g.area_um2 / (g.perimeter_um ^ 2),
    ST_Area(g.geom) / ST_Area(shape.hull),
    shape.major_um, shape.minor_um, shape.major_um / shape.minor_um,
    nuclei.n,
    1000 * nuclei.n / g.area_um2,
    nuclei.mean_area_um2,
    nuclei.median_area_um2,
    coalesce((SELECT jsonb_object_agg(c.class, c.n ORDER BY c.class)
              FROM (SELECT class, count(*) AS n FROM unnest(nuclei.classes) class
                    GROUP BY class) c),
             '{}'),
    lumina.n,
    coalesce(lumina.area_um2, 0),
    coalesce(lumina.area_um2, 0) / g.area_um2,
    least(first.distance_px, other.distance_px) * s.mpp,
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
-- Nearest other gland, boundary to boundary, in two steps that need fewer exact distances than
-- KNN on <-> (which also measures the gland itself and the candidate after the nearest): the
-- exact distance d to the gland whose box is nearest (KNN on <#>, boxes only) bounds the answer,
-- so the nearest gland is that one or one whose box lies within d (GiST geom, then <#>).
LEFT JOIN LATERAL (
    SELECT o.id, ST_Distance(g.geom, o.geom) AS distance_px
    FROM gland o
    WHERE o.slide_id = p_slide_id AND o.id <> g.id
    ORDER BY g.geom <#> o.geom
    LIMIT 1
) first ON true
LEFT JOIN LATERAL (
    SELECT min(ST_Distance(g.geom, o.geom)) AS distance_px
    FROM gland o
    WHERE o.slide_id = p_slide_id AND o.id <> g.id AND o.id <> first.id
      AND o.geom && ST_Expand(g.geom, first.distance_px)
      AND g.geom <#> o.geom <= first.distance_px
) other ON true
-- Shape: the convex hull (for solidity) and the axes: the maximum Feret diameter (the hull's
-- longest chord, in µm) and the hull's extent across it, read off the hull turned so that the
-- diameter lies along x. Exact for ellipses and independent of the GEOS version
-- (ST_OrientedEnvelope changed its rectangle in GEOS 3.12). _ST_LongestLine is ST_LongestLine
-- without its two extra convex hulls (of a hull, here). One LATERAL of nested subqueries, each
-- value computed once per gland (OFFSET 0), and no Memoize node hashing hulls that never repeat.
CROSS JOIN LATERAL (
    SELECT hull,
           ST_XMax(turned) - ST_XMin(turned) AS major_um,
           ST_YMax(turned) - ST_YMin(turned) AS minor_um
    FROM (
        SELECT hull, ST_Rotate(hull_um, -atan2(
                   ST_Y(ST_EndPoint(chord)) - ST_Y(ST_StartPoint(chord)),
                   ST_X(ST_EndPoint(chord)) - ST_X(ST_StartPoint(chord)))) AS turned
        FROM (
            SELECT hull, hull_um, _ST_LongestLine(hull_um, hull_um) AS chord
            FROM (
                SELECT hull, ST_Scale(hull, s.mpp_x, s.mpp_y) AS hull_um
                FROM (SELECT ST_ConvexHull(g.geom) AS hull OFFSET 0) convex
                OFFSET 0
            ) scaled
            OFFSET 0
        ) feret
        OFFSET 0
    ) along
) shape
LEFT JOIN tissue ON tissue.gland_id = g.id
WHERE g.slide_id = p_slide_id AND g.id % p_lanes = p_lane
$$;


CREATE OR REPLACE FUNCTION slide_features(p_slide_id integer)
RETURNS SETOF slide_feature
LANGUAGE sql STABLE PARALLEL SAFE AS $$
WITH
class_counts AS (
    SELECT 'nucleus' AS object, class, count(*) AS n FROM nucleus WHERE slide_id = p_slide_id
    GROUP BY class
    UNION ALL
    SELECT 'gland', class, count(*) FROM gland WHERE slide_id = p_slide_id GROUP BY class
    UNION ALL
    SELECT 'lumen', class, count(*) FROM lumen WHERE slide_id = p_slide_id GROUP BY class
    UNION ALL
    SELECT 'tissue_region', class, count(*) FROM tissue_region WHERE slide_id = p_slide_id
    GROUP BY class
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
-- Each feature's values gathered once, then summarised one feature at a time: 13 sorts of one
-- value per gland instead of one sort of every (feature, value) pair by name.
quantiles AS (
    SELECT coalesce(jsonb_object_agg(v.name, jsonb_build_object(
               'mean', q.mean, 'q05', q.q[1], 'q25', q.q[2], 'q50', q.q[3], 'q75', q.q[4],
               'q95', q.q[5]) ORDER BY v.name) FILTER (WHERE q.mean IS NOT NULL), '{}')
               AS by_feature
    FROM (
        SELECT array_agg(f.area_um2) AS area_um2, array_agg(f.perimeter_um) AS perimeter_um,
               array_agg(f.circularity) AS circularity, array_agg(f.solidity) AS solidity,
               array_agg(f.major_axis_um) AS major_axis_um,
               array_agg(f.minor_axis_um) AS minor_axis_um,
               array_agg(f.elongation) AS elongation,
               array_agg(f.nuclei_count::double precision) AS nuclei_count,
               array_agg(f.nuclei_per_1000um2) AS nuclei_per_1000um2,
               array_agg(f.nuclear_area_mean_um2) AS nuclear_area_mean_um2,
               array_agg(f.lumen_count::double precision) AS lumen_count,
               array_agg(f.lumen_to_gland_area_ratio) AS lumen_to_gland_area_ratio,
               array_agg(f.nearest_gland_distance_um) AS nearest_gland_distance_um
        FROM gland_feature f
        WHERE f.slide_id = p_slide_id
    ) a
    CROSS JOIN LATERAL (VALUES
        ('area_um2', a.area_um2), ('perimeter_um', a.perimeter_um),
        ('circularity', a.circularity), ('solidity', a.solidity),
        ('major_axis_um', a.major_axis_um), ('minor_axis_um', a.minor_axis_um),
        ('elongation', a.elongation), ('nuclei_count', a.nuclei_count),
        ('nuclei_per_1000um2', a.nuclei_per_1000um2),
        ('nuclear_area_mean_um2', a.nuclear_area_mean_um2),
        ('lumen_count', a.lumen_count),
        ('lumen_to_gland_area_ratio', a.lumen_to_gland_area_ratio),
        ('nearest_gland_distance_um', a.nearest_gland_distance_um)
    ) v(name, vals)
    CROSS JOIN LATERAL (
        SELECT avg(x) AS mean,
               percentile_cont(ARRAY[0.05, 0.25, 0.5, 0.75, 0.95]) WITHIN GROUP (ORDER BY x) AS q
        FROM unnest(v.vals) x
        WHERE x IS NOT NULL
    ) q
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
