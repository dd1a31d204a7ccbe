// export-engine serve's web page: NiiVue shows the session's volume in three planes; a click segments
// there (POST /sessions/{id}/clicks), shift-click removes, and the mask comes back as an overlay.
// It uses the same HTTP API as every other client.
import { Niivue, SHOW_RENDER } from "@niivue/niivue";
import { mat4, vec4 } from "gl-matrix";

const NIFTI_VOX_OFFSET = 108; // float32 in a NIfTI-1 header: where the voxels start

const state = {
  session: null,
  shape: null,
  affineInverse: null,
  busy: false,
  lastClick: null,
  lastStep: null,
  error: null,
};
const nv = new Niivue({
  backColor: [0.1, 0.1, 0.12, 1],
  dragAndDropEnabled: false,
  multiplanarShowRender: SHOW_RENDER.NEVER, // three planes; no 3-D render
});
window.viewer = { nv, state }; // read by the browser test

function status(text, isError = false) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = isError ? "error" : "";
  if (isError) state.error = text;
}

async function api(method, path, body, headers) {
  const response = await fetch(path, { method, body, headers });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail ?? detail;
    } catch (_) {
      /* not JSON */
    }
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return response;
}

// The inverse of the volume's voxel -> world affine (NIfTI header rows), column-major for gl-matrix.
function inverseAffine(rows) {
  const m = mat4.fromValues(...[0, 1, 2, 3].flatMap((c) => [0, 1, 2, 3].map((r) => rows[r][c])));
  return mat4.invert(mat4.create(), m);
}

async function openVolume(file) {
  state.busy = true;
  status(`uploading ${file.name} ...`);
  try {
    if (state.session) {
      await api("DELETE", `/sessions/${state.session}`).catch(() => {});
    }
    const form = new FormData();
    form.append("volume", file, file.name);
    const created = await (await api("POST", "/sessions", form)).json();
    state.session = created.id;
    state.shape = created.shape;
    await nv.loadVolumes([
      { url: `/sessions/${created.id}/volume`, name: "volume.nii.gz" },
      { url: `/sessions/${created.id}/mask?format=nii.gz`, name: "mask.nii.gz", colormap: "red", opacity: 0.5 },
    ]);
    state.affineInverse = inverseAffine(nv.volumes[0].hdr.affine);
    setMaskRange();
    status(`volume ${created.shape.join(" x ")}: click to add, shift-click to remove`);
  } catch (err) {
    status(`could not open ${file.name}: ${err.message}`, true);
  } finally {
    state.busy = false;
  }
}

function setMaskRange() {
  const overlay = nv.volumes[1];
  overlay.cal_min = 0.5;
  overlay.cal_max = 1;
  nv.updateGLVolume();
}

// Canvas pixel -> voxel (d, h, w) of the volume's own grid, through world millimetres and the inverse affine.
function voxelAt(event) {
  const pos = nv.getNoPaddingNoBorderCanvasRelativeMousePosition(event, nv.gl.canvas);
  if (!pos) return null;
  const frac = nv.canvasPos2frac([pos.x * nv.uiData.dpr, pos.y * nv.uiData.dpr]);
  if (frac[0] < 0) return null;
  const mm = nv.frac2mm(frac);
  const vox = vec4.transformMat4(vec4.create(), vec4.fromValues(mm[0], mm[1], mm[2], 1), state.affineInverse);
  const point = [0, 1, 2].map((i) => Math.round(vox[i]));
  return point.every((v, i) => v >= 0 && v < state.shape[i]) ? point : null;
}

async function segment(point, positive) {
  state.busy = true;
  status(`${positive ? "adding" : "removing"} at [${point.join(", ")}] ...`);
  try {
    const headers = { "Content-Type": "application/json" };
    const body = JSON.stringify({ point, positive });
    const result = await (await api("POST", `/sessions/${state.session}/clicks`, body, headers)).json();
    await showMask();
    state.lastClick = { point, positive, session: state.session, iou: result.iou, voxels: result.voxels };
    status(`${result.clicks} click(s): ${result.voxels} voxels, predicted IoU ${result.iou.toFixed(3)}`);
  } catch (err) {
    status(`click failed: ${err.message}`, true);
  } finally {
    state.busy = false;
  }
}

// The mask as an uncompressed NIfTI: its voxels, in the file's order, are the overlay's img as they are.
async function showMask() {
  const buffer = await (await api("GET", `/sessions/${state.session}/mask?format=nii`)).arrayBuffer();
  const offset = new DataView(buffer).getFloat32(NIFTI_VOX_OFFSET, true);
  nv.volumes[1].img.set(new Uint8Array(buffer, offset));
  setMaskRange();
}

// Undo (one click back) or reset (every click forgotten; the next click may move the model's crop).
async function step(action) {
  if (!state.session || state.busy) return;
  state.busy = true;
  try {
    const result = await (await api("POST", `/sessions/${state.session}/${action}`)).json();
    await showMask();
    state.lastStep = { action, clicks: result.clicks, voxels: result.voxels };
    status(`${result.clicks} click(s): ${result.voxels} voxels`);
  } catch (err) {
    status(`${action} failed: ${err.message}`, true);
  } finally {
    state.busy = false;
  }
}

async function main() {
  await nv.attachToCanvas(document.getElementById("gl"));
  nv.setSliceType(nv.sliceTypeMultiplanar);
  document.getElementById("file").addEventListener("change", (e) => {
    if (e.target.files.length) openVolume(e.target.files[0]);
  });
  document.getElementById("undo").addEventListener("click", () => step("undo"));
  document.getElementById("reset").addEventListener("click", () => step("reset"));
  // Capture phase: the click is read before NiiVue's own handler (which moves the crosshair; with shift, pans).
  nv.gl.canvas.addEventListener(
    "mousedown",
    (event) => {
      if (event.button !== 0 || !state.session || state.busy) return;
      const point = voxelAt(event);
      if (point) segment(point, !event.shiftKey);
    },
    { capture: true },
  );
  document.body.dataset.ready = "1";
  status("Open a .nii, .nii.gz or .npy volume; then click to add to the mask, shift-click to remove.");
}

main().catch((err) => status(`the viewer failed to start: ${err.message}`, true));
