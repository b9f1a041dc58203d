// The slide viewer: the slide's image tiles and its objects' vector tiles (served by
// dashboard/viewer_server.py) in OpenLayers, on a map whose units are the slide's level-0 pixels
// (x right, y up: the slide spans [0, -height] to [width, 0]).
"use strict";

const LAYERS = { tissue_region: "Tissue", gland: "Glands", lumen: "Lumina", nucleus: "Nuclei" };
const ONE = { tissue_region: "Tissue region", gland: "Gland", lumen: "Lumen", nucleus: "Nucleus" };
const DRAW_ORDER = ["nucleus", "lumen", "gland", "tissue_region"]; // a click picks the first
const FILL_ALPHA = { tissue_region: 0.12, gland: 0.15, lumen: 0.3, nucleus: 0.35 };
const STROKE_PX = { tissue_region: 1.5, gland: 2, lumen: 1.5, nucleus: 1 };
const Z_INDEX = { tissue_region: 0, nucleus_density: 1, gland: 2, lumen: 3, nucleus: 4 }; // drawn bottom up
const DENSITY_FULL = 15000; // nuclei per mm² drawn at full strength

const shown = new Set(Object.keys(LAYERS)); // tables drawn
const hidden = new Set(); // classes not drawn
const styles = new Map();

function rgba(rgb, alpha) {
  return `rgba(${rgb[0]},${rgb[1]},${rgb[2]},${alpha})`;
}

function cached(key, make) {
  if (!styles.has(key)) styles.set(key, make());
  return styles.get(key);
}

function makeStyle(info) {
  const colour = (cls) => info.colours[cls] || [128, 128, 128];

  function density(feature) {
    let total = 0;
    let best = null;
    for (const [cls, n] of Object.entries(feature.getProperties())) {
      if (typeof n !== "number" || hidden.has(cls)) continue;
      total += n;
      if (best === null || n > feature.get(best)) best = cls;
    }
    if (!total) return null;
    const e = feature.getExtent();
    const mm2 = (e[2] - e[0]) * (e[3] - e[1]) * (info.mpp / 1000) ** 2;
    const strength = Math.min(1, Math.sqrt(total / mm2 / DENSITY_FULL));
    const alpha = Math.round((0.1 + 0.5 * strength) * 20) / 20;
    return cached(`density|${best}|${alpha}`, () => new ol.style.Style({
      zIndex: Z_INDEX.nucleus_density,
      fill: new ol.style.Fill({ color: rgba(colour(best), alpha) }),
    }));
  }

  return function style(feature) {
    const layer = feature.get("layer");
    if (layer === "nucleus_density") return shown.has("nucleus") ? density(feature) : null;
    const cls = feature.get("class");
    if (!shown.has(layer) || hidden.has(cls)) return null;
    if (feature.getType() === "Point") {
      return cached(`point|${cls}`, () => new ol.style.Style({
        zIndex: Z_INDEX.nucleus,
        image: new ol.style.Circle({
          radius: 2.5, fill: new ol.style.Fill({ color: rgba(colour(cls), 0.9) }),
        }),
      }));
    }
    return cached(`${layer}|${cls}`, () => new ol.style.Style({
      zIndex: Z_INDEX[layer],
      stroke: new ol.style.Stroke({ color: rgba(colour(cls), 1), width: STROKE_PX[layer] }),
      fill: new ol.style.Fill({ color: rgba(colour(cls), FILL_ALPHA[layer]) }),
    }));
  };
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function checkbox(label, checked, onChange, swatch = null, count = null) {
  const input = element("input", { type: "checkbox" });
  input.checked = checked;
  input.addEventListener("change", () => onChange(input.checked));
  const parts = [input];
  if (swatch) parts.push(element("span", { class: "swatch", style: `background:${rgba(swatch, 1)}` }));
  parts.push(label);
  if (count !== null) parts.push(element("span", { class: "count" }, count.toLocaleString("en")));
  return element("label", {}, ...parts);
}

function legend(info, image, objects) {
  const box = document.getElementById("layers");
  const redraw = () => objects.changed();
  box.append(element("fieldset", {},
    checkbox("Slide image", image.getVisible(), (on) => image.setVisible(on))));
  for (const table of ["nucleus", "gland", "lumen", "tissue_region"]) {
    const counts = info.counts[table] || {};
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    if (!total) continue;
    const classes = element("div", { class: "classes" });
    for (const [cls, n] of Object.entries(counts).sort()) {
      classes.append(checkbox(cls, true, (on) => {
        if (on) hidden.delete(cls); else hidden.add(cls);
        redraw();
      }, info.colours[cls], n));
    }
    const set = element("fieldset", { "data-table": table },
      checkbox(LAYERS[table], true, (on) => {
        if (on) shown.add(table); else shown.delete(table);
        redraw();
      }, null, total), classes);
    if (table === "nucleus") {
      set.append(element("div", { class: "note" },
        `outlines from zoom ${info.nuclei.outlines_from_zoom}, centroids from ` +
        `${info.nuclei.centroids_from_zoom}, density (opacity: nuclei per mm²) below`));
    }
    box.append(set);
  }
}

function table(rows) {
  const body = element("tbody");
  for (const [key, value] of rows) {
    let text = value;
    if (value === null) text = "–";
    else if (typeof value === "number") text = Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(3);
    else if (value !== null && typeof value === "object") text = JSON.stringify(value);
    body.append(element("tr", {}, element("td", {}, key), element("td", {}, String(text))));
  }
  return element("table", {}, body);
}

async function showDetails(info, table_, id) {
  const box = document.getElementById("details");
  const res = await fetch(`/slides/${info.id}/runs/${info.run_id}/objects/${table_}/${id}.json`);
  if (!res.ok) {
    box.replaceChildren(element("p", { class: "error" }, await res.text()));
    return;
  }
  const found = await res.json();
  const m = found.measurements;
  const rows = Object.entries(m).filter(([, v]) => v !== null && typeof v !== "object");
  box.replaceChildren(element("h2", { "data-object": `${table_}/${id}` },
    `${ONE[table_]} ${id}: ${m.class}`), table(rows));
  if (found.features) {
    box.append(element("h2", {}, "Gland features"), table(Object.entries(found.features)));
  }
}

async function main() {
  const slide = new URLSearchParams(location.search).get("slide");
  const title = document.getElementById("title");
  const res = await fetch(`/slides/${encodeURIComponent(slide)}/info.json`);
  if (!res.ok) {
    title.replaceChildren(element("span", { class: "error" }, await res.text()));
    return;
  }
  const info = await res.json();
  title.textContent = `${info.name}: ${info.width.toLocaleString("en")} × ` +
    `${info.height.toLocaleString("en")} px at ${info.mpp.toFixed(3)} µm/px`;
  const extent = [0, -info.height, info.width, 0];
  const projection = new ol.proj.Projection({
    code: "slide-pixels", units: "pixels", extent, metersPerUnit: info.mpp * 1e-6,
  });
  const resolutions = [];
  for (let z = 0; z <= info.max_zoom; z++) resolutions.push(2 ** (info.max_zoom - z));
  const tileGrid = new ol.tilegrid.TileGrid({ origin: [0, 0], resolutions, tileSize: info.tile_px, extent });

  const image = new ol.layer.Tile({
    visible: info.image,
    source: new ol.source.XYZ({
      projection, tileGrid, url: `/slides/${info.id}/image/{z}/{x}/{y}.jpg`, transition: 0,
    }),
  });
  const objects = new ol.layer.VectorTile({
    renderMode: "hybrid",
    style: makeStyle(info),
    source: new ol.source.VectorTile({
      projection, tileGrid, format: new ol.format.MVT(), transition: 0,
      url: `/slides/${info.id}/runs/${info.run_id}/tiles/{z}/{x}/{y}.pbf`,
    }),
  });
  if (info.run_id === null) objects.setVisible(false);
  // A refused object tile: if the slide was re-ingested meanwhile, show its new run.
  objects.getSource().on("tileloaderror", async () => {
    const now = await fetch(`/slides/${info.id}/info.json`).then((r) => (r.ok ? r.json() : null));
    if (now && now.run_id !== info.run_id) location.reload();
  });
  const map = new ol.Map({
    target: "map",
    layers: [image, objects],
    controls: ol.control.defaults.defaults({ attribution: false }).extend([
      new ol.control.ScaleLine({ units: "metric" }),
      new ol.control.ZoomToExtent({ extent, label: "⤢", tipLabel: "Whole slide" }),
      new ol.control.MousePosition({
        coordinateFormat: (c) => `${(c[0] * info.mpp).toFixed(1)}, ${(-c[1] * info.mpp).toFixed(1)} µm`,
      }),
    ]),
    view: new ol.View({
      projection, extent, constrainOnlyCenter: true,
      resolutions: [...resolutions, 0.5, 0.25], // two zooms past level 0
    }),
  });
  map.getView().fit(extent);
  legend(info, image, objects);
  if (!info.image) {
    document.getElementById("layers").prepend(
      element("p", { class: "hint" }, "The slide's image file cannot be read here: objects only."));
  }

  map.on("singleclick", (event) => {
    const found = map.getFeaturesAtPixel(event.pixel, {
      layerFilter: (l) => l === objects, hitTolerance: 3,
    }).filter((f) => f.get("layer") in LAYERS && f.getId() !== undefined);
    found.sort((a, b) => DRAW_ORDER.indexOf(a.get("layer")) - DRAW_ORDER.indexOf(b.get("layer")));
    if (found.length) showDetails(info, found[0].get("layer"), found[0].getId());
  });
  // For scripts and tests: the map, its layers, and how many times it finished rendering.
  window.viewer = { map, image, objects, info, shown, hidden, renders: 0 };
  map.on("rendercomplete", () => { window.viewer.renders += 1; });
}

main();
