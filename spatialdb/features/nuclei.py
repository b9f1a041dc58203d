"""A slide's nuclei as columns, streamed out of the server by COPY into Arrow: centroids in µm,
class, area, shape and stain intensity, in nucleus id order (the order of the nucleus export)."""

from __future__ import annotations

import io

import pandas as pd

from spatialdb.store.morphometry import MORPHOMETRY
from spatialdb.store.schema import INTENSITY_COLUMNS

#: The stored measurements read with the centroids: area, shape and stain intensity.
MEASURED = ("area_um2", *MORPHOMETRY, *INTENSITY_COLUMNS)


def read_nuclei(cursor, slide_id: int) -> pd.DataFrame:
    """Columns `x_um`, `y_um`, `class` and `MEASURED` of the slide's nuclei, by nucleus id."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    measured = ", ".join(f"n.{name}" for name in MEASURED)
    query = (
        "COPY (SELECT ST_X(n.centroid) * s.mpp_x AS x_um, ST_Y(n.centroid) * s.mpp_y AS y_um, "
        f"n.class, {measured} FROM nucleus n JOIN slide s ON s.id = n.slide_id "
        "WHERE n.slide_id = %s ORDER BY n.id) TO STDOUT WITH (FORMAT csv, HEADER)"
    )
    data = io.BytesIO()
    cursor.copy_expert(cursor.mogrify(query, (slide_id,)).decode(), data)
    data.seek(0)
    types = {"x_um": pa.float64(), "y_um": pa.float64(), "class": pa.string()}
    types |= {name: pa.float64() for name in MEASURED}
    options = pacsv.ConvertOptions(column_types=types, strings_can_be_null=False)
    return pacsv.read_csv(data, convert_options=options).to_pandas()
