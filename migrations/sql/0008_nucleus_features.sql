-- nucleus_features(slide, radius): a NULL radius skips the neighbour count (one GiST descent
-- per nucleus, most of the function's time); the other columns are unchanged.

CREATE OR REPLACE FUNCTION nucleus_features(p_slide_id integer, p_radius_um double precision DEFAULT 25)
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
-- Neighbours, only when a radius is given: GiST nucleus.centroid within it (ST_DWithin expands
-- the box), one index descent per nucleus. NULL radius: not counted (the export counts them
-- with a k-d tree, `spatialdb.features.neighbourhood`).
LEFT JOIN LATERAL (
    SELECT count(*)::integer AS n FROM nucleus m
    WHERE m.slide_id = p_slide_id AND m.id <> n.id
      AND ST_DWithin(m.centroid, n.centroid, p_radius_um / s.mpp)
) neighbours ON p_radius_um IS NOT NULL
WHERE n.slide_id = p_slide_id
$$;
