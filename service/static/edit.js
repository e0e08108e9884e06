// facegen playground, edit panel: upload a face, pick the target and the strength, see before | after.
// Uses app.js's helpers (api, headers, errorText, loadImage), loaded before this file.
"use strict";

const EDIT_POLL_MS = 400;

function editStatus(text, fraction) {
  $("edit-status").textContent = text;
  if (fraction === null || fraction === undefined) $("edit-progress").removeAttribute("value");
  else $("edit-progress").value = Math.max(0, Math.min(1, fraction));
}

function showUploadPreview() {
  const file = $("edit-file").files[0];
  $("edit-before").hidden = !file;
  if (file) $("edit-before-image").src = URL.createObjectURL(file);
}

async function pollEdit(job) {
  const response = await fetch(api(job.links.self), { headers: headers() });
  if (!response.ok) throw new Error(await errorText(response));
  const body = await response.json();
  if (body.status === "finished") return;
  if (["failed", "canceled", "stopped"].includes(body.status)) throw new Error("job " + body.status + ": " + (body.error || ""));
  const p = body.progress;
  editStatus(body.status + (p && p.total ? " " + p.step + "/" + p.total + " steps" : "…"), p && p.total ? p.step / p.total : null);
  await new Promise((resolve) => setTimeout(resolve, EDIT_POLL_MS));
  return pollEdit(job);
}

async function submitEdit(event) {
  event.preventDefault();
  const file = $("edit-file").files[0];
  $("edit-error").hidden = true;
  $("edit-result").hidden = true;
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  form.append("label", $("edit-label").value);
  if ($("edit-strength").dataset.touched) form.append("strength", $("edit-strength").value);
  form.append("animation", $("edit-animation").checked ? "true" : "false");
  $("edit-submit").disabled = true;
  editStatus("Uploading…", null);
  try {
    const response = await fetch(api("edit"), { method: "POST", headers: headers(), body: form });
    if (!response.ok) throw new Error(await errorText(response));
    const job = await response.json();
    await pollEdit(job);
    await loadImage(job.links.result, $("edit-result-image"), $("edit-download"), "facegen-edit-" + job.job_id + ".png");
    $("edit-result").hidden = false;
    if (job.links.animation) {
      await loadImage(job.links.animation, $("edit-animation-image"), $("edit-animation-download"),
                      "facegen-edit-" + job.job_id + ".gif");
    }
    $("edit-animation-figure").hidden = !job.links.animation;
    editStatus("Done: before | after.", 1);
  } catch (e) {
    $("edit-error").textContent = e.message;
    $("edit-error").hidden = false;
    editStatus("Failed.", 0);
  } finally {
    $("edit-submit").disabled = false;
  }
}

function initEdit() {
  $("edit-file").addEventListener("change", showUploadPreview);
  $("edit-strength").addEventListener("input", () => {  // untouched, the server's default strength applies
    $("edit-strength").dataset.touched = "1";
    $("edit-strength-value").textContent = $("edit-strength").value;
  });
  $("edit-form").addEventListener("submit", submitEdit);
}

document.addEventListener("DOMContentLoaded", initEdit);
