/*
 * fhirbox console: a job's progress, as the jobs page shows it: the percent done and its bar
 * (indeterminate while the total is unknown), the progress text, and the throughput, from the
 * samples this page has seen (one per change of the count): resources/s now, the average once
 * the job has ended, and a chart of resources/s over the job's life drawn on its canvas.
 */

import { fmt, fmtBytes } from '/console/dom.js';

const MAX_SAMPLES = 600;
/** The statuses of a job that may still change (and may be cancelled). */
export const ACTIVE = new Set(['waiting', 'in-progress']);

/** Percent done, or null when unknown (no total yet). */
export function jobPercent(job) {
  if (job.status === 'completed') return 100;
  const measure = job.kind === 'import' ? job.bytes : job.resources;
  if (!measure || !measure.total) return null;
  return Math.min(100, Math.max(0, Math.floor((100 * (measure.done || 0)) / measure.total)));
}

export function setBar(parts, percent, active) {
  const value = percent == null ? 0 : percent;
  parts.bar.dataset.percent = String(value);
  parts.fill.style.width = `${value}%`;
  parts.bar.classList.toggle('indeterminate', percent == null && active);
}

export function progressText(job) {
  const resources = job.resources || {};
  const bytes = job.bytes || {};
  const texts = [resources.total != null
    ? `${fmt(resources.done)} of ${fmt(resources.total)} resources`
    : `${fmt(resources.done)} resources`];
  if (bytes.total != null) texts.push(`${fmtBytes(bytes.done)} of ${fmtBytes(bytes.total)}`);
  else if (bytes.done != null) texts.push(fmtBytes(bytes.done));
  return texts.join(' · ');
}

export function addSample(record, t, resources) {
  const samples = record.samples;
  const last = samples[samples.length - 1];
  if (last && last.resources === resources) return; // a status change alone is no new sample
  samples.push({ t, resources });
  if (samples.length > MAX_SAMPLES) samples.shift();
}

/** Resources per second between successive samples. */
export function rates(samples) {
  const points = [];
  for (let i = 1; i < samples.length; i += 1) {
    const seconds = (samples[i].t - samples[i - 1].t) / 1000;
    if (seconds > 0) {
      const rate = (samples[i].resources - samples[i - 1].resources) / seconds;
      points.push({ t: samples[i].t, rate: Math.max(0, rate) });
    }
  }
  return points;
}

export function throughputText(job, points) {
  if (ACTIVE.has(job.status)) {
    const last = points[points.length - 1];
    return last ? `${fmt(Math.round(last.rate))} resources/s` : '— resources/s';
  }
  // Ended: the average over the job's life, from the server's own times.
  const seconds = (Date.parse(job.finishedAt) - Date.parse(job.startedAt)) / 1000;
  if (!(seconds > 0)) return '';
  const done = (job.resources && job.resources.done) || 0;
  return `${fmt(Math.round(done / seconds))} resources/s on average`;
}

/** A line of resources/s over time on the canvas, sized for the screen's pixel ratio. */
export function drawChart(canvas, points) {
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return; // not displayed (another page): drawn when shown
  const ratio = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext('2d');
  if (!ctx) return;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = '11px system-ui, sans-serif';
  ctx.fillStyle = '#6b7280';
  if (points.length < 2) {
    ctx.fillText('resources/s: not enough samples yet', 6, height / 2 + 4);
    return;
  }
  const t0 = points[0].t;
  const span = Math.max(1, points[points.length - 1].t - t0);
  const max = Math.max(1, ...points.map((p) => p.rate));
  const top = 16;
  const bottom = height - 2;
  const x = (t) => 2 + ((t - t0) / span) * (width - 4);
  const y = (rate) => bottom - (rate / max) * (bottom - top);
  ctx.fillText(`peak ${fmt(Math.round(max))} resources/s`, 6, 11);
  ctx.beginPath();
  points.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.rate)) : ctx.moveTo(x(p.t), y(p.rate))));
  ctx.strokeStyle = '#2563eb';
  ctx.lineWidth = 1.5;
  ctx.stroke();
  ctx.lineTo(x(points[points.length - 1].t), bottom);
  ctx.lineTo(x(t0), bottom);
  ctx.closePath();
  ctx.fillStyle = 'rgba(37, 99, 235, 0.12)';
  ctx.fill();
}
