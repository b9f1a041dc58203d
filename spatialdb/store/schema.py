"""The database schema as SQLAlchemy 2 + GeoAlchemy2 models (the migrations create it).

Geometries are in level-0 pixel coordinates of their slide, SRID 0; `slide.mpp_x/mpp_y` convert to
µm. Object tables (`nucleus`, `gland`, `lumen`, `tissue_region`) are partitioned by `slide_id`
(LIST, one partition per slide holding its current run) so that a slide is loaded, swapped,
queried and dropped on its own; every object row carries `slide_id` and `run_id`.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from geoalchemy2 import Geometry
from sqlalchemy import (
    REAL,
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SLIDE_STATUSES = ("registered", "ready")
RUN_STATUSES = ("complete", "superseded")
RUN_KINDS = ("inference", "import", "curated")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _now() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Slide(Base):
    """A whole-slide image: where it is, what it contains, and which run is current."""

    __tablename__ = "slide"
    __table_args__ = (
        CheckConstraint("mpp_x > 0 AND mpp_y > 0", name="mpp_positive"),
        CheckConstraint("width > 0 AND height > 0", name="size_positive"),
        CheckConstraint(f"status IN {SLIDE_STATUSES}", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    file_path: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    fingerprint: Mapped[str] = mapped_column(Text, nullable=False, index=True)
    width: Mapped[int] = mapped_column(BigInteger, nullable=False)
    height: Mapped[int] = mapped_column(BigInteger, nullable=False)
    mpp_x: Mapped[float] = mapped_column(Double, nullable=False)
    mpp_y: Mapped[float] = mapped_column(Double, nullable=False)
    objective_power: Mapped[float | None] = mapped_column(Double)
    vendor: Mapped[str | None] = mapped_column(Text)
    level_count: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="registered")
    current_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("run.id", ondelete="SET NULL", use_alter=True)
    )
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class Model(Base):
    """Network weights that produced runs: preset, hash, classes and training resolution."""

    __tablename__ = "model"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    preset: Mapped[str] = mapped_column(Text, nullable=False)
    weights_hash: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    class_names: Mapped[dict] = mapped_column(JSONB, nullable=False)
    mpp: Mapped[float] = mapped_column(Double, nullable=False)
    info: Mapped[dict] = mapped_column(JSONB, nullable=False, server_default="{}")
    created_at: Mapped[datetime] = _now()


class Run(Base):
    """One complete set of objects for a slide (inference, import or curation)."""

    __tablename__ = "run"
    __table_args__ = (
        CheckConstraint(f"status IN {RUN_STATUSES}", name="status"),
        CheckConstraint(f"kind IN {RUN_KINDS}", name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slide_id: Mapped[int] = mapped_column(
        ForeignKey("slide.id", ondelete="CASCADE"), nullable=False, index=True
    )
    model_id: Mapped[int | None] = mapped_column(ForeignKey("model.id"))
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    parameters: Mapped[dict] = mapped_column(JSONB, nullable=False, server_default="{}")
    timings: Mapped[dict] = mapped_column(JSONB, nullable=False, server_default="{}")
    object_counts: Mapped[dict] = mapped_column(JSONB, nullable=False, server_default="{}")
    load_report: Mapped[dict] = mapped_column(JSONB, nullable=False, server_default="{}")
    started_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


#: Columns stored in the centroid GiST index's leaves: the gland features read exactly these from
#: the nuclei and lumina inside each gland, so that probe is an index-only scan (no heap reads).
CENTROID_INDEX_INCLUDE = ("slide_id", "class", "area_um2", "centroid")


class ObjectColumns:
    """Columns shared by every object table; the geometry type differs per table."""

    geometry_type = "POLYGON"

    slide_id: Mapped[int] = mapped_column(ForeignKey("slide.id"), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id"), nullable=False)
    uuid: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    class_: Mapped[str] = mapped_column("class", Text, nullable=False)
    probability: Mapped[float | None] = mapped_column(REAL)
    area_um2: Mapped[float] = mapped_column(Double, nullable=False)
    perimeter_um: Mapped[float] = mapped_column(Double, nullable=False)
    # Shape measurements (`spatialdb.store.morphometry`); empty for objects stored before them
    # until `spatialdb db backfill-morphometry`.
    equivalent_diameter_um: Mapped[float | None] = mapped_column(Double)
    major_axis_um: Mapped[float | None] = mapped_column(Double)
    minor_axis_um: Mapped[float | None] = mapped_column(Double)
    eccentricity: Mapped[float | None] = mapped_column(Double)
    orientation_deg: Mapped[float | None] = mapped_column(Double)
    circularity: Mapped[float | None] = mapped_column(Double)
    solidity: Mapped[float | None] = mapped_column(Double)
    extent: Mapped[float | None] = mapped_column(Double)

    @declared_attr
    def geom(cls) -> Mapped[object]:
        return mapped_column(
            Geometry(cls.geometry_type, srid=0, spatial_index=False), nullable=False
        )

    @declared_attr
    def centroid(cls) -> Mapped[object]:
        return mapped_column(Geometry("POINT", srid=0, spatial_index=False), nullable=False)

    @declared_attr.directive
    def __table_args__(cls) -> tuple:
        name = cls.__tablename__
        return (
            Index(f"ix_{name}_geom", "geom", postgresql_using="gist"),
            Index(
                f"ix_{name}_centroid",
                "centroid",
                postgresql_using="gist",
                postgresql_include=list(CENTROID_INDEX_INCLUDE),
            ),
            Index(f"ix_{name}_slide_id_class", "slide_id", "class"),
            {"postgresql_partition_by": "LIST (slide_id)"},
        )


#: Stain intensity of a segmented nucleus (measured by `inference.intensity`, whose names these
#: are): haematoxylin and eosin optical density in the nucleus and its cytoplasm ring.
INTENSITY_COLUMNS = tuple(
    f"{place}{stain}_od_{stat}"
    for place in ("", "cytoplasm_")
    for stain in ("haematoxylin", "eosin")
    for stat in ("mean", "std", "q10", "q50", "q90")
)


class Nucleus(ObjectColumns, Base):
    __tablename__ = "nucleus"

    # The INTENSITY_COLUMNS (a class body's namespace takes them), empty for imported nuclei.
    vars().update({name: mapped_column(Double, nullable=True) for name in INTENSITY_COLUMNS})


class Gland(ObjectColumns, Base):
    __tablename__ = "gland"


class Lumen(ObjectColumns, Base):
    __tablename__ = "lumen"


class TissueRegion(ObjectColumns, Base):
    __tablename__ = "tissue_region"
    geometry_type = "MULTIPOLYGON"


#: Object tables by name, in load order.
OBJECT_MODELS = {m.__tablename__: m for m in (Nucleus, Gland, Lumen, TissueRegion)}
OBJECT_TABLES = tuple(OBJECT_MODELS)


class GlandFeature(Base):
    """Per-gland features of a slide's current run (filled by `gland_features()` in SQL)."""

    __tablename__ = "gland_feature"

    slide_id: Mapped[int] = mapped_column(
        ForeignKey("slide.id", ondelete="CASCADE"), primary_key=True
    )
    gland_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), nullable=False)
    gland_uuid: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    gland_class: Mapped[str] = mapped_column(Text, nullable=False)
    centroid_x_px: Mapped[float] = mapped_column(Double, nullable=False)
    centroid_y_px: Mapped[float] = mapped_column(Double, nullable=False)
    area_um2: Mapped[float] = mapped_column(Double, nullable=False)
    perimeter_um: Mapped[float] = mapped_column(Double, nullable=False)
    circularity: Mapped[float] = mapped_column(Double, nullable=False)
    solidity: Mapped[float] = mapped_column(Double, nullable=False)
    major_axis_um: Mapped[float] = mapped_column(Double, nullable=False)
    minor_axis_um: Mapped[float] = mapped_column(Double, nullable=False)
    elongation: Mapped[float] = mapped_column(Double, nullable=False)
    nuclei_count: Mapped[int] = mapped_column(Integer, nullable=False)
    nuclei_per_1000um2: Mapped[float] = mapped_column(Double, nullable=False)
    nuclear_area_mean_um2: Mapped[float | None] = mapped_column(Double)
    nuclear_area_median_um2: Mapped[float | None] = mapped_column(Double)
    nuclei_by_class: Mapped[dict] = mapped_column(JSONB, nullable=False)
    lumen_count: Mapped[int] = mapped_column(Integer, nullable=False)
    lumen_area_um2: Mapped[float] = mapped_column(Double, nullable=False)
    lumen_to_gland_area_ratio: Mapped[float] = mapped_column(Double, nullable=False)
    nearest_gland_distance_um: Mapped[float | None] = mapped_column(Double)
    tissue_class: Mapped[str | None] = mapped_column(Text)


class SlideFeature(Base):
    """Per-slide features of a slide's current run (filled by `slide_features()` in SQL)."""

    __tablename__ = "slide_feature"

    slide_id: Mapped[int] = mapped_column(
        ForeignKey("slide.id", ondelete="CASCADE"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), nullable=False)
    computed_at: Mapped[datetime] = _now()
    tissue_area_um2: Mapped[float] = mapped_column(Double, nullable=False)
    nucleus_count: Mapped[int] = mapped_column(Integer, nullable=False)
    gland_count: Mapped[int] = mapped_column(Integer, nullable=False)
    lumen_count: Mapped[int] = mapped_column(Integer, nullable=False)
    gland_area_um2: Mapped[float] = mapped_column(Double, nullable=False)
    lumen_area_um2: Mapped[float] = mapped_column(Double, nullable=False)
    gland_area_fraction: Mapped[float | None] = mapped_column(Double)
    lumen_area_fraction: Mapped[float | None] = mapped_column(Double)
    stroma_area_um2: Mapped[float | None] = mapped_column(Double)
    nuclei_in_glands: Mapped[int] = mapped_column(Integer, nullable=False)
    nuclei_in_stroma: Mapped[int] = mapped_column(Integer, nullable=False)
    nuclei_per_1000um2_in_glands: Mapped[float | None] = mapped_column(Double)
    nuclei_per_1000um2_in_stroma: Mapped[float | None] = mapped_column(Double)
    object_counts: Mapped[dict] = mapped_column(JSONB, nullable=False)
    tissue_class_area_um2: Mapped[dict] = mapped_column(JSONB, nullable=False)
    gland_feature_quantiles: Mapped[dict] = mapped_column(JSONB, nullable=False)


class SlideSpatialFeature(Base):
    """Spatial statistics of a slide's current run (`spatialdb.features.spatial`): densities per
    compartment, immune infiltration, cross-K, per-class nucleus feature quantiles."""

    __tablename__ = "slide_spatial_feature"

    slide_id: Mapped[int] = mapped_column(
        ForeignKey("slide.id", ondelete="CASCADE"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), nullable=False)
    computed_at: Mapped[datetime] = _now()
    statistics: Mapped[dict] = mapped_column(JSONB, nullable=False)


class NucleusDensity(Base):
    """Nuclei of a slide's current run counted per class in square cells, a pyramid of them:
    level k's cells are `DENSITY_CELL_PX` · 2^k level-0 pixels wide (filled by a feature refresh;
    the slide viewer's low zooms draw them)."""

    __tablename__ = "nucleus_density"

    slide_id: Mapped[int] = mapped_column(
        ForeignKey("slide.id", ondelete="CASCADE"), primary_key=True
    )
    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    gx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    gy: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    class_: Mapped[str] = mapped_column("class", Text, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), nullable=False)
    n: Mapped[int] = mapped_column(Integer, nullable=False)


#: Side of a level-0 `nucleus_density` cell in level-0 pixels, and how many cells the top level
#: may have across a slide.
DENSITY_CELL_PX = 256
DENSITY_TOP_CELLS = 32


class ObjectClass(Base):
    """A class name objects carry, with its display colour (QuPath path class colour)."""

    __tablename__ = "object_class"
    __table_args__ = (
        CheckConstraint(
            "array_length(color, 1) = 3 AND 0 <= ALL(color) AND 255 >= ALL(color)", name="rgb"
        ),
    )

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    color: Mapped[list[int]] = mapped_column(ARRAY(SmallInteger), nullable=False)
    created_at: Mapped[datetime] = _now()


class SlideEmbedding(Base):
    """A slide compressed into a grid of encoder embeddings (Neural Image Compression): raw
    little-endian arrays of `rows` x `cols` x `channels` (`dtype`) and a `rows` x `cols` tissue
    mask (uint8), one per slide and encoder."""

    __tablename__ = "slide_embedding"
    __table_args__ = (CheckConstraint("rows > 0 AND cols > 0 AND channels > 0", name="shape"),)

    slide_id: Mapped[int] = mapped_column(
        ForeignKey("slide.id", ondelete="CASCADE"), primary_key=True
    )
    encoder_sha256: Mapped[str] = mapped_column(Text, primary_key=True)
    encoder: Mapped[str] = mapped_column(Text, nullable=False)
    source_run_id: Mapped[int | None] = mapped_column(ForeignKey("run.id", ondelete="SET NULL"))
    mpp: Mapped[float] = mapped_column(Double, nullable=False)
    cell_px: Mapped[int] = mapped_column(Integer, nullable=False)
    rows: Mapped[int] = mapped_column(Integer, nullable=False)
    cols: Mapped[int] = mapped_column(Integer, nullable=False)
    channels: Mapped[int] = mapped_column(Integer, nullable=False)
    dtype: Mapped[str] = mapped_column(Text, nullable=False)
    tissue_cells: Mapped[int] = mapped_column(Integer, nullable=False)
    embeddings: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    tissue: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = _now()


class SlidePrediction(Base):
    """A slide-level model's prediction for a slide: a class probability or a value."""

    __tablename__ = "slide_prediction"
    __table_args__ = (CheckConstraint("task IN ('classification', 'regression')", name="task"),)

    slide_id: Mapped[int] = mapped_column(
        ForeignKey("slide.id", ondelete="CASCADE"), primary_key=True
    )
    model_sha256: Mapped[str] = mapped_column(Text, primary_key=True)
    model_name: Mapped[str] = mapped_column(Text, nullable=False)
    target: Mapped[str] = mapped_column(Text, nullable=False)
    task: Mapped[str] = mapped_column(Text, nullable=False)
    value: Mapped[float] = mapped_column(Double, nullable=False)
    label: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict] = mapped_column(JSONB, nullable=False, server_default="{}")
    created_at: Mapped[datetime] = _now()


#: Per table, the measurement columns a load may fill (`RunWriter.add(measurements=...)`).
OPTIONAL_MEASUREMENTS = {"nucleus": INTENSITY_COLUMNS}

#: Tables of derived features, cleared when a slide's run is replaced.
FEATURE_TABLES = ("gland_feature", "slide_feature", "slide_spatial_feature", "nucleus_density")
