/**
 * The SPE workspace panel for JupyterLab (issue 15).
 *
 * A side panel shows the workspace's permit (reference, title, status, period, datasets and
 * columns granted), the privacy budget, and the permit's export requests with the reviewers'
 * shared comments; a banner says when the permit is suspended or about to expire. "Request
 * export" on the file browser's context menu sends the selected files through the airlock.
 *
 * Everything goes through the workspace's own Jupyter server extension (workspaces.labserver:
 * GET spe/overview, POST spe/exports), which holds the workspace token: the browser never sees
 * it, nor the SPE API's address. Data are written with textContent only (never as HTML).
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, InputDialog, showDialog } from '@jupyterlab/apputils';
import { IFileBrowserFactory } from '@jupyterlab/filebrowser';
import { ServerConnection } from '@jupyterlab/services';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

const PANEL_ID = 'spe-workspace-panel';
const CMD_EXPORT = 'spe:request-export';
const CMD_REFRESH = 'spe:refresh-panel';
const EXPIRY_WARNING_DAYS = 14;
const REFRESH_MS = 30000;

const ICON = new LabIcon({
  name: 'spe:shield',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">' +
    '<path class="jp-icon3" fill="#616161" d="M8 1 2 3.5v4C2 11 4.6 14.1 8 15c3.4-.9 6-4 ' +
    '6-7.5v-4L8 1zm0 2.1 4 1.7v2.7c0 2.5-1.7 4.8-4 5.6-2.3-.8-4-3.1-4-5.6V4.8l4-1.7z"/></svg>'
});

interface IProblem {
  error: { status: number; title: string; detail: string };
}
interface IPermit {
  id: string;
  reference: string;
  title: string;
  status: string;
  valid_from: string;
  valid_until: string;
  access_mode: string;
  conditions: string[];
  datasets: { dataset: string; tables: Record<string, string[]> }[];
}
interface IBudget {
  epsilon_total: number;
  epsilon_spent: number;
  epsilon_remaining: number;
  delta_total: number;
  delta_spent: number;
  max_epsilon_per_query: number;
  queries: number;
}
interface IQuery {
  id: string;
  created_at: string;
  state: string;
  epsilon: number;
  delta: number;
}
interface IExportFile {
  name: string;
  kind: string | null;
  outcome: string | null;
  size: number;
  checks: { name: string; outcome: string; reason: string }[];
}
interface IExport {
  id: string;
  state: string;
  justification: string;
  created_at: string;
  reason: string | null;
  files: IExportFile[];
  votes: { decision: string; comment: string | null }[];
}
interface IOverview {
  permit: IPermit | IProblem;
  budget: IBudget | IProblem;
  queries: IQuery[] | IProblem;
  exports: IExport[] | IProblem;
}

function isProblem(x: unknown): x is IProblem {
  return typeof x === 'object' && x !== null && 'error' in x;
}

async function callServer(
  path: string,
  init: RequestInit = {}
): Promise<{ status: number; body: any }> {
  const settings = ServerConnection.makeSettings();
  const url = settings.baseUrl.replace(/\/?$/, '/') + path;
  const resp = await ServerConnection.makeRequest(url, init, settings);
  let body: any = null;
  try {
    body = await resp.json();
  } catch {
    body = null;
  }
  return { status: resp.status, body };
}

/** An element with text content only (data never become HTML). */
function el(tag: string, text?: string, cls?: string): HTMLElement {
  const node = document.createElement(tag);
  if (text !== undefined) {
    node.textContent = text;
  }
  if (cls) {
    node.className = cls;
  }
  return node;
}

function day(iso: string): string {
  return iso ? iso.slice(0, 10) : '?';
}

const SVG_NS = 'http://www.w3.org/2000/svg';

/** Cumulative epsilon spent over time (answered queries) against the permit's cap. */
function spendingPlot(queries: IQuery[], budget: IBudget): SVGSVGElement {
  const width = 220;
  const height = 70;
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('width', String(width));
  svg.setAttribute('height', String(height));
  svg.setAttribute('data-spe', 'spending-plot');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', 'Epsilon spent over time against the cap');
  const points = queries
    .filter(q => q.state !== 'failed')
    .map(q => ({ t: Date.parse(q.created_at), e: q.epsilon }))
    .sort((a, b) => a.t - b.t);
  const cap = Math.max(budget.epsilon_total, 1e-9);
  const t0 = points.length ? points[0].t : Date.now();
  const t1 = Math.max(Date.now(), t0 + 1);
  const x = (t: number): number => 4 + ((width - 8) * (t - t0)) / (t1 - t0);
  const y = (e: number): number => height - 4 - ((height - 12) * Math.min(e, cap)) / cap;
  const line = (x1: number, y1: number, x2: number, y2: number, cls: string): void => {
    const l = document.createElementNS(SVG_NS, 'line');
    l.setAttribute('x1', String(x1));
    l.setAttribute('y1', String(y1));
    l.setAttribute('x2', String(x2));
    l.setAttribute('y2', String(y2));
    l.setAttribute('class', cls);
    svg.appendChild(l);
  };
  line(4, y(cap), width - 4, y(cap), 'spe-plot-cap');
  // Spending before the oldest query shown (older ones are not listed) is the baseline.
  let total = budget.epsilon_spent - points.reduce((acc, p) => acc + p.e, 0);
  let path = `M ${x(t0)} ${y(Math.max(total, 0))}`;
  for (const p of points) {
    total += p.e;
    path += ` H ${x(p.t)} V ${y(total)}`;
  }
  path += ` H ${x(t1)}`;
  const spent = document.createElementNS(SVG_NS, 'path');
  spent.setAttribute('d', path);
  spent.setAttribute('class', 'spe-plot-spent');
  svg.appendChild(spent);
  return svg;
}

/** The side panel: permit, budget, exports; refreshed on demand and every 30 s. */
export class SPEPanel extends Widget {
  constructor() {
    super();
    this.id = PANEL_ID;
    this.addClass('spe-panel');
    this.title.icon = ICON;
    this.title.caption = 'SPE permit, privacy budget and exports';
    this.node.setAttribute('data-spe', 'panel');
  }

  async refresh(): Promise<void> {
    let overview: IOverview | null = null;
    let failure = '';
    try {
      const { status, body } = await callServer('spe/overview');
      if (status === 200) {
        overview = body as IOverview;
      } else {
        failure = isProblem(body)
          ? `${body.error.title}: ${body.error.detail}`
          : `the workspace server answered ${status}`;
      }
    } catch (err) {
      failure = 'the workspace server cannot be reached';
    }
    this.render(overview, failure);
  }

  protected onAfterAttach(): void {
    void this.refresh();
    this._timer = window.setInterval(() => void this.refresh(), REFRESH_MS);
  }

  protected onBeforeDetach(): void {
    window.clearInterval(this._timer);
  }

  private render(overview: IOverview | null, failure: string): void {
    const root = this.node;
    root.replaceChildren();
    const head = el('h2', 'Secure processing environment');
    root.appendChild(head);
    const refresh = el('button', 'Refresh', 'jp-Button jp-mod-styled jp-mod-reject');
    refresh.setAttribute('data-spe', 'refresh');
    refresh.addEventListener('click', () => void this.refresh());
    root.appendChild(refresh);
    if (!overview) {
      root.appendChild(el('p', failure, 'spe-error'));
      return;
    }
    this.renderPermit(overview.permit);
    this.renderBudget(overview.budget, overview.queries);
    this.renderQueries(overview.queries);
    this.renderExports(overview.exports);
    const refreshed = el('p', `Updated ${new Date().toLocaleTimeString()}`, 'spe-muted');
    root.appendChild(refreshed);
  }

  private problem(section: string, p: IProblem): void {
    this.node.appendChild(el('h3', section));
    this.node.appendChild(
      el('p', `${p.error.title} (${p.error.status}): ${p.error.detail}`, 'spe-error')
    );
  }

  private renderPermit(permit: IPermit | IProblem): void {
    if (isProblem(permit)) {
      this.problem('Permit', permit);
      return;
    }
    const root = this.node;
    const banner = this.banner(permit);
    if (banner) {
      root.appendChild(banner);
    }
    root.appendChild(el('h3', 'Permit'));
    const dl = el('dl');
    const row = (k: string, v: string | HTMLElement): void => {
      dl.appendChild(el('dt', k));
      const dd = el('dd');
      if (typeof v === 'string') {
        dd.textContent = v;
      } else {
        dd.appendChild(v);
      }
      dl.appendChild(dd);
    };
    row('Reference', permit.reference);
    row('Title', permit.title);
    row(
      'Status',
      el('span', permit.status, `spe-status spe-status-${permit.status}`)
    );
    row('Period', `${day(permit.valid_from)} to ${day(permit.valid_until)}`);
    row('Access', permit.access_mode === 'dp_only' ? 'DP queries only' : permit.access_mode);
    root.appendChild(dl);
    root.appendChild(el('h3', 'Data granted'));
    const list = el('ul');
    for (const ds of permit.datasets || []) {
      const item = el('li', ds.dataset);
      const tables = el('ul');
      for (const [table, columns] of Object.entries(ds.tables)) {
        tables.appendChild(el('li', `${table}: ${columns.join(', ')}`));
      }
      item.appendChild(tables);
      list.appendChild(item);
    }
    root.appendChild(list);
    if (permit.conditions && permit.conditions.length) {
      root.appendChild(el('h3', 'Conditions'));
      const conditions = el('ul');
      permit.conditions.forEach(c => conditions.appendChild(el('li', c)));
      root.appendChild(conditions);
    }
  }

  private banner(permit: IPermit): HTMLElement | null {
    if (permit.status === 'suspended') {
      return el(
        'div',
        'This permit is suspended: queries and exports are refused and the workspace may ' +
          'be stopped. Your files are kept; the access body decides whether it resumes.',
        'spe-banner'
      );
    }
    if (permit.status === 'revoked' || permit.status === 'expired') {
      return el(
        'div',
        `This permit is ${permit.status}: the workspace stops and its data are deleted ` +
          'after the retention period. Request exports of results before then.',
        'spe-banner'
      );
    }
    const left = (Date.parse(permit.valid_until) - Date.now()) / 86400000;
    if (permit.status === 'active' && left < EXPIRY_WARNING_DAYS) {
      return el(
        'div',
        `This permit expires in ${Math.max(0, Math.ceil(left))} day(s), on ` +
          `${day(permit.valid_until)}: then the workspace stops. Request exports before then.`,
        'spe-banner'
      );
    }
    return null;
  }

  private renderBudget(budget: IBudget | IProblem, queries: IQuery[] | IProblem): void {
    if (isProblem(budget)) {
      this.problem('Privacy budget', budget);
      return;
    }
    const root = this.node;
    root.appendChild(el('h3', 'Privacy budget'));
    const total = budget.epsilon_total || 1;
    const bar = el('div', undefined, 'spe-budget-bar');
    const spent = el('div', undefined, 'spe-budget-spent');
    spent.style.width = `${(100 * budget.epsilon_spent) / total}%`;
    const leftBar = el('div', undefined, 'spe-budget-left');
    leftBar.style.width = `${(100 * budget.epsilon_remaining) / total}%`;
    bar.append(spent, leftBar);
    root.appendChild(bar);
    if (!isProblem(queries) && queries.length) {
      root.appendChild(spendingPlot(queries, budget));
      root.appendChild(el('div', 'Epsilon spent over time; dashed: the cap', 'spe-muted'));
    }
    const dl = el('dl');
    const pairs: [string, string][] = [
      ['Epsilon left', `${budget.epsilon_remaining.toPrecision(3)} of ${budget.epsilon_total}`],
      ['Epsilon spent', budget.epsilon_spent.toPrecision(3)],
      ['Per query at most', String(budget.max_epsilon_per_query)],
      ['Delta spent', `${budget.delta_spent.toPrecision(2)} of ${budget.delta_total}`],
      ['Queries run', String(budget.queries)]
    ];
    for (const [k, v] of pairs) {
      dl.append(el('dt', k), el('dd', v));
    }
    dl.setAttribute('data-spe', 'budget');
    root.appendChild(dl);
  }

  private renderQueries(queries: IQuery[] | IProblem): void {
    if (isProblem(queries)) {
      this.problem('Recent queries', queries);
      return;
    }
    const root = this.node;
    root.appendChild(el('h3', 'Recent queries'));
    if (!queries.length) {
      root.appendChild(el('p', 'No DP query yet (%%dp in a notebook cell).', 'spe-muted'));
      return;
    }
    const list = el('ul');
    list.setAttribute('data-spe', 'queries');
    for (const q of queries.slice(0, 10)) {
      const when = new Date(q.created_at).toLocaleString();
      list.appendChild(el('li', `${when}: epsilon ${q.epsilon} (${q.state})`));
    }
    root.appendChild(list);
  }

  private renderExports(exports: IExport[] | IProblem): void {
    if (isProblem(exports)) {
      this.problem('Export requests', exports);
      return;
    }
    const root = this.node;
    root.appendChild(el('h3', 'Export requests'));
    if (!exports.length) {
      root.appendChild(
        el('p', 'None yet: right-click a file and choose "Request export".', 'spe-muted')
      );
      return;
    }
    for (const req of exports.slice(0, 20)) {
      const box = el('div', undefined, 'spe-export');
      box.setAttribute('data-spe-export', req.id);
      const files = req.files.map(f => f.name).join(', ') || '(no file)';
      box.appendChild(el('div', `${day(req.created_at)} ${files}`));
      const state = el('span', req.state, `spe-status spe-status-${req.state}`);
      state.setAttribute('data-spe', 'export-state');
      box.appendChild(state);
      for (const f of req.files) {
        const line = el('div', `${f.name}: ${f.outcome ?? 'not checked yet'}`, 'spe-muted');
        line.setAttribute('data-spe', 'export-file');
        box.appendChild(line);
        for (const c of (f.checks || []).filter(c => c.outcome !== 'pass')) {
          box.appendChild(el('div', `  ${c.name} (${c.outcome}): ${c.reason}`, 'spe-muted'));
        }
      }
      if (req.reason) {
        box.appendChild(el('div', req.reason, 'spe-muted'));
      }
      for (const vote of req.votes || []) {
        if (vote.comment) {
          box.appendChild(el('div', `Reviewer (${vote.decision}): ${vote.comment}`, 'spe-muted'));
        }
      }
      root.appendChild(box);
    }
  }

  private _timer = 0;
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: '@spe/workspace-labextension:plugin',
  description: 'The SPE permit panel and "Request export" on the file browser.',
  autoStart: true,
  requires: [IFileBrowserFactory],
  optional: [ILabShell],
  activate: (
    app: JupyterFrontEnd,
    browsers: IFileBrowserFactory,
    labShell: ILabShell | null
  ) => {
    const panel = new SPEPanel();
    app.shell.add(panel, 'left', { rank: 50 });

    app.commands.addCommand(CMD_REFRESH, {
      label: 'Refresh the SPE panel',
      execute: () => panel.refresh()
    });

    app.commands.addCommand(CMD_EXPORT, {
      label: 'Request export',
      caption: 'Send the selected files to the airlock for review',
      icon: ICON,
      execute: async () => {
        const browser = browsers.tracker.currentWidget;
        if (!browser) {
          return;
        }
        const paths = Array.from(browser.selectedItems())
          .filter(item => item.type !== 'directory')
          .map(item => item.path);
        if (!paths.length) {
          return;
        }
        const answer = await InputDialog.getText({
          title: `Request export of ${paths.length} file(s)`,
          label: `${paths.join(', ')}\nWhy must these results leave the SPE?`,
          placeholder: 'Justification, e.g. figure 2 of the paper'
        });
        if (!answer.button.accept || !answer.value || !answer.value.trim()) {
          return;
        }
        const { status, body } = await callServer('spe/exports', {
          method: 'POST',
          body: JSON.stringify({ paths, justification: answer.value.trim() })
        });
        if (status === 201) {
          await showDialog({
            title: 'Export requested',
            body: `State: ${body.state}. The panel shows its checks and the reviewers' decision.`,
            buttons: [Dialog.okButton()]
          });
        } else {
          const detail = isProblem(body)
            ? `${body.error.title}: ${body.error.detail}`
            : `The workspace server answered ${status}.`;
          await showDialog({
            title: 'Export refused',
            body: detail,
            buttons: [Dialog.okButton()]
          });
        }
        await panel.refresh();
        if (labShell) {
          labShell.activateById(PANEL_ID);
        }
      }
    });

    app.contextMenu.addItem({
      command: CMD_EXPORT,
      selector: '.jp-DirListing-item[data-isdir="false"]',
      rank: 20
    });
  }
};

export default plugin;
