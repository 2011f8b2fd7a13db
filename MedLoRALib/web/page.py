"""The page: controls on the left, Slicer's slice views on the right.

Element ids (``#open-path``, ``#results``...) are part of the page's contract: the browser
tests and the benchmark find the controls by them.
"""

from __future__ import annotations

from .views import WINDOW_PRESETS


def build(app) -> None:
    from trame.widgets import client, html
    from trame_vuetify.ui.vuetify3 import SinglePageLayout
    from trame_vuetify.widgets import vuetify3 as v

    ctrl = app.server.controller
    with SinglePageLayout(app.server, full_height=True) as layout:
        client.Style("html { overflow-y: hidden; } .mono { font-family: monospace; } "
                     "#results tr.result-row { cursor: pointer; } #results tr.selected { background: #335; } "
                     ".malignant { color: rgb(230, 26, 26); } .benign { color: rgb(26, 204, 51); }")
        layout.title.set_text("MedLoRA")
        with layout.toolbar:
            v.VSpacer()
            html.Div("{{ status }}", id="status", classes="text-caption mx-4")
            v.VProgressLinear(indeterminate=True, active=("busy",), absolute=True, location="bottom")
        with layout.content:
            with v.VContainer(fluid=True, classes="fill-height pa-0"):
                with html.Div(style="display: flex; width: 100%; height: 100%;"):
                    with html.Div(style="width: 420px; overflow-y: auto; padding: 8px; flex: none;"):
                        _controls(app, v, html, ctrl)
                    with html.Div(id="views", style="flex: 1; position: relative; height: calc(100vh - 64px);"):
                        app.layout_manager.initialize_layout_grid(layout)
        html.Div("{{ view_geometry }}", id="view-geometry", style="display: none;")
    app.ui = layout


def _controls(app, v, html, ctrl) -> None:
    v.VAlert(text=("error",), v_show=("error",), type="error", id="error", density="compact", closable=False,
             classes="mb-2 text-body-2")
    html.Div("Data root: {{ data_root }}", classes="text-caption mb-1")
    with html.Div(classes="d-flex"):
        v.VTextField(v_model=("open_path", ""), label="CT under the data root", id="open-path", density="compact",
                     hide_details=True)
        v.VBtn("Open", id="open-btn", click=(app.open_path, "[open_path]"), classes="ml-1", disabled=("busy",))
    html.Div("or upload a CT (.nrrd, .nii.gz, or the DICOM files of one series):", classes="text-caption mt-2")
    html.Input(type="file", id="upload", multiple=True, classes="text-body-2", __events=["change"],
               change=("const f = [...$event.target.files]; const n = f.reduce((a, x) => a + x.size, 0); "
                       "if (n > max_upload_bytes) { error = 'upload is ' + (n / 1048576).toFixed(1) + ' MiB, more "
                       "than the limit of ' + (max_upload_bytes / 1048576).toFixed(1) + ' MiB (medlora web "
                       "--max-upload-mb): put large studies under the data root and open them by path.'; } "
                       f"else if (f.length) {{ trigger('{ctrl.trigger_name(app.upload)}', [f]); }} "
                       "$event.target.value = '';"))
    v.VSelect(v_model=("study", None), items=("studies",), label="Study", density="compact", hide_details=True,
              classes="mt-2", id="study", update_modelValue=(app.choose_study, "[$event]"))
    with html.Div(classes="d-flex align-center mt-2"):
        html.Span("Window", classes="mr-2 text-body-2")
        for preset in WINDOW_PRESETS:
            v.VBtn(preset, size="small", classes="mr-1", id=f"window-{preset}", click=(app.set_window, f"['{preset}']"),
                   variant=(f"window === '{preset}' ? 'flat' : 'outlined'",))
    with html.Div(classes="d-flex mt-2"):
        v.VTextField(v_model=("centre_text", ""), label="Centre views on R A S (mm)", id="centre-on",
                     density="compact", hide_details=True)
        v.VBtn("Go", id="centre-btn", click=(app.centre_on, "[centre_text]"), classes="ml-1")
    v.VDivider(classes="my-2")
    v.VSwitch(v_model=("placing", True), label="Click places a nodule point", id="placing", density="compact",
              hide_details=True, color="primary", update_modelValue=(app.set_placing, "[$event]"))
    with html.Div(classes="d-flex"):
        v.VTextField(v_model=("points_path", ""), label="Points file (LIDC XML, .mrk.json, CSV)", id="points-path",
                     density="compact", hide_details=True)
        v.VBtn("Import", id="import-btn", click=(app.import_points, "[points_path]"), classes="ml-1")
    with html.Table(id="points", classes="text-body-2 mt-1", style="width: 100%;"):
        with html.Tr(v_for="p in points", key="p.id", classes="point-row"):
            html.Td("{{ p.name }}")
            html.Td("{{ p.ras.join(', ') }}", classes="mono text-caption")
            html.Td("{{ p.label }}")
            with html.Td():
                v.VBtn("B", size="x-small", variant="text", click=(app.label_point, "[p.id, 0]"), title="benign")
                v.VBtn("M", size="x-small", variant="text", click=(app.label_point, "[p.id, 1]"), title="malignant")
                v.VBtn("✕", size="x-small", variant="text", click=(app.delete_point, "[p.id]"), classes="delete-point",
                       title="delete")
    with v.VTabs(v_model=("tab", "score"), density="compact", classes="mt-2"):
        for name in ("score", "train", "batch"):
            v.VTab(name, value=name, id=f"tab-{name}")
    with html.Div(v_show="tab === 'score'"):
        _score_tab(app, v, html)
    with html.Div(v_show="tab === 'train'"):
        _train_tab(app, v, html)
    with html.Div(v_show="tab === 'batch'"):
        _batch_tab(app, v, html)


def _score_tab(app, v, html) -> None:
    v.VDivider(classes="my-2")
    with html.Div(classes="d-flex align-center"):
        v.VSelect(v_model=("adapter", None), items=("adapters",), label="Adapter", id="adapter", density="compact",
                  hide_details=True)
        v.VBtn("↻", click=app.refresh_adapters, variant="text", title="reload the adapter store")
    html.Div("In the store: {{ adapters.join(', ') || 'none' }}", id="adapter-names", classes="text-caption")
    with html.Div(classes="d-flex mt-2"):
        v.VBtn("Score", id="score-btn", color="primary", click=(app.score, "[adapter]"), disabled=("busy",))
        v.VBtn("Cancel", id="cancel-btn", click=app.cancel, disabled=("!busy",), classes="ml-2")
    with html.Table(id="results", classes="text-body-2 mt-2", style="width: 100%;"):
        with html.Tr():
            for title in ("Nodule", "Probability", "Label", "Adapter", "TTA"):
                html.Th(title, style="text-align: left;")
        with html.Tr(v_for="row in results", key="row.index", classes=("['result-row', row.index === selected_row ? "
                                                                            "'selected' : '']",),
                     click=(app.select_row, "[row.index]")):
            html.Td("{{ row.nodule }}")
            html.Td("{{ row.probability || row.error }}", classes=("['probability', 'mono', row.colour]",),
                    __properties=[("data_ras", "data-ras")], data_ras=("row.ras",))
            html.Td("{{ row.label }}", classes=("['label', row.colour]",))
            html.Td("{{ row.adapter }}{{ row.random_init ? ' (random init)' : '' }}")
            html.Td("{{ row.tta }}", classes="tta")
    html.Img(src=("thumbnail",), v_show=("thumbnail",), id="thumbnail", style="width: 100%; margin-top: 8px;")


def _train_tab(app, v, html) -> None:
    from .training_view import PRESETS

    html.Div("{{ labelled }}", id="labelled", classes="text-caption my-1")
    v.VTextField(v_model=("train_name", "my-adapter"), label="Adapter name", id="train-name", density="compact",
                 hide_details=True)
    with html.Div(classes="d-flex align-center mt-2"):
        html.Span("Options", classes="text-body-2 mr-2")
        with html.Select(v_model=("train_preset", "default"), id="train-preset", classes="text-body-2",
                         style="border: 1px solid #aaa; padding: 2px;"):
            for preset in PRESETS:
                html.Option({"default": "medlora train defaults", "tiny": "tiny (seconds on a CPU)"}[preset],
                            value=preset)
        v.VTextField(v_model=("train_epochs", 20), label="Epochs", id="train-epochs", type="number",
                     density="compact", hide_details=True, classes="ml-2", style="max-width: 90px;")
    with html.Div(classes="d-flex mt-2"):
        v.VBtn("Train", id="train-start", color="primary", click=(app.train.start, "[false, train_preset, train_name, train_epochs]"), disabled=("busy",))
        v.VBtn("Resume", id="train-resume", click=(app.train.start, "[true, train_preset, train_name, train_epochs]"), disabled=("busy",), classes="ml-2")
        v.VBtn("Cancel", id="train-cancel", click=app.train.cancel, disabled=("!training",), classes="ml-2")
    v.VProgressLinear(model_value=("train_progress",), height=18, color="primary", classes="mt-2",
                      id="train-progress-bar")
    html.Div("{{ train_progress }}%", id="train-progress", classes="text-caption")
    html.Div("{{ train_status }}", id="train-status", classes="text-caption")
    html.Div(v_html=("train_curve",), id="train-curve", classes="mt-1")


def _batch_tab(app, v, html) -> None:
    html.Div("Scores every study of a folder under the data root with the adapter chosen under Score; each "
             "study's points come from the annotation files beside it (LIDC XML, .mrk.json, NAME.csv).",
             classes="text-caption my-1")
    with html.Div(classes="d-flex"):
        v.VTextField(v_model=("batch_folder", ""), label="Folder of studies", id="batch-folder", density="compact",
                     hide_details=True)
        v.VBtn("Score all", id="batch-start", color="primary", click=(app.start_batch, "[batch_folder, adapter]"), disabled=("busy",),
               classes="ml-1")
    with html.Div(classes="d-flex align-center mt-2"):
        v.VProgressLinear(model_value=("batch_progress",), height=18, color="primary")
        v.VBtn("Cancel", id="batch-cancel", click=app.cancel_batch, disabled=("!busy",), classes="ml-2")
    html.Div("{{ batch_progress }}% — {{ batch_status }}", id="batch-status", classes="text-caption")
    with html.Table(id="batch-results", classes="text-body-2 mt-2", style="width: 100%;"):
        with html.Tr():
            for title in ("Study", "Nodule", "Probability", "Label"):
                html.Th(title, style="text-align: left;")
        with html.Tr(v_for="row in batch_results", key="row.index", classes="batch-row"):
            html.Td("{{ row.volume }}")
            html.Td("{{ row.nodule }}")
            html.Td("{{ row.probability || row.error }}", classes=("['probability', 'mono', row.colour]",))
            html.Td("{{ row.label }}", classes=("[row.colour]",))
    html.A("Download CSV", href=("batch_csv",), v_show=("batch_csv",), download="medlora-batch-results.csv",
           id="batch-csv", classes="text-body-2")
