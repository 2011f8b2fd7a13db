"""MedLoRA: lung nodule malignancy with LoRA-adapted Vision Transformers, in 3D Slicer.

The widget is thin: everything it does is in ``MedLoRALib.slicer`` (Qt-free, tested with
``slicer-core``). The model never runs in Slicer's process: scoring goes to a warm
``medlora serve`` engine, training to a ``medlora train`` child process; the GUI polls
both with a QTimer, so it never freezes, and Cancel ends the whole process tree.
"""

import importlib.util
import os
import sys
from typing import Annotated

import slicer
from slicer.util import VTKObservationMixin


def _repositoryLayoutRoot():
    """Folder holding ``MedLoRALib`` and ``Resources``: beside this file when built, one up in the repository."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.dirname(here)):
        if os.path.isdir(os.path.join(candidate, "MedLoRALib")):
            return candidate
    return here


LIB_ROOT = _repositoryLayoutRoot()
if importlib.util.find_spec("MedLoRALib") is None:  # developer mode: the repository's MedLoRA/ folder
    sys.path.insert(0, LIB_ROOT)

try:
    import qt
    from slicer.i18n import tr as _
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
except ImportError:  # slicer-core without Slicer's application (CI, scripts): logic only
    qt = None
    from MedLoRALib.slicer.headless import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
        parameterNodeWrapper,
    )
    from MedLoRALib.slicer.headless import tr as _

    def Choice(values):  # noqa: N802 - Slicer's name
        return values

    def WithinRange(low, high):  # noqa: N802 - Slicer's name
        return (low, high)

from slicer import vtkMRMLMarkupsNode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode

from MedLoRALib.errors import MedLoRAError
from MedLoRALib.slicer import mrml
from MedLoRALib.slicer.module_logic import ModuleLogic
from MedLoRALib.slicer.reload import reload_library
from MedLoRALib.slicer.results import export_csv, read_table, result_position_ras
from MedLoRALib.slicer.training import TrainingConfig

DEVICES = ["auto", "cpu", "cuda", "mps"]


class MedLoRA(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedLoRA")
        self.parent.categories = [_("Chest Imaging")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedLoRA contributors"]
        self.parent.helpText = _(
            "Place a point on each lung nodule (or an ROI) and score its malignancy with a LoRA adapter; "
            "score every loaded study; train your own adapter from labelled points in the background.")
        self.parent.acknowledgementText = _(
            "Method: Veasey & Amini 2025 (LoRA on self-supervised ViTs for lung nodules), MeLo, MED-PEFT.")

    def resourcePath(self, filename):
        return os.path.join(LIB_ROOT, "Resources", filename)


@parameterNodeWrapper
class MedLoRAParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    inputMarkups: vtkMRMLMarkupsNode
    resultsTable: vtkMRMLTableNode
    device: Annotated[str, Choice(DEVICES)] = "auto"
    testTimeAugmentation: bool = True
    adapterName: str = "my-adapter"
    backbone: str = "dinov2_vits14"
    epochs: Annotated[int, WithinRange(1, 1000)] = 10
    rank: Annotated[int, WithinRange(1, 64)] = 8


class MedLoRAWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._guiTag = None
        self._job = None  # a ScoreJob, BatchScoring or TrainingJob in progress
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)

    def resourcePath(self, filename):
        return os.path.join(LIB_ROOT, "Resources", filename)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedLoRA.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedLoRALogic()
        self.ui.plotWidget.setMRMLScene(slicer.mrmlScene)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for button, handler in ((self.ui.scoreButton, self.onScore), (self.ui.scoreAllButton, self.onScoreAll),
                                (self.ui.exportCsvButton, self.onExportCsv), (self.ui.cubeButton, self.onCube),
                                (self.ui.exportCropsButton, self.onExportCrops),
                                (self.ui.labelBenignButton, lambda: self.onLabel(0)),
                                (self.ui.labelMalignantButton, lambda: self.onLabel(1)),
                                (self.ui.startTrainingButton, self.onStartTraining),
                                (self.ui.cancelButton, self.onCancel),
                                (self.ui.importAdapterButton, self.onImportAdapter),
                                (self.ui.exportAdapterButton, self.onExportAdapter),
                                (self.ui.deleteAdapterButton, self.onDeleteAdapter),
                                (self.ui.restartEngineButton, self.onRestartEngine)):
            button.connect("clicked()", handler)
        self.ui.adapterComboBox.connect("currentTextChanged(QString)", self.onAdapterChanged)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultClicked)
        self.ui.pythonPathLineEdit.currentPath = self.logic.enginePython()
        self.ui.pythonPathLineEdit.connect("currentPathChanged(QString)", self.logic.setEnginePython)
        self.initializeParameterNode()
        self.refreshAdapters()

    def cleanup(self):
        self._timer.stop()
        self.removeObservers()
        if self.logic:
            if self._job is not None:  # no training or scoring process outlives the module
                self.logic.cancelJob(self._job)
                self._job = None
            self.logic.close()

    def onReload(self):
        """Reload MedLoRALib's modules too (importlib), then this module as Slicer does."""
        self.cleanup()
        reload_library()
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiTag)
            self._guiTag = None

    def onSceneStartClose(self, caller, event):
        self._parameterNode = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiTag)
        self._parameterNode = self.logic.getParameterNode()
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.inputMarkups:
            self._parameterNode.inputMarkups = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLMarkupsFiducialNode")
        self._guiTag = self._parameterNode.connectGui(self.ui)

    # --- helpers -----------------------------------------------------------------------
    def _status(self, text):
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 5000)

    def _run(self, what, function, *args):
        """Run a quick action; a MedLoRAError is shown with its own message, nothing else is hidden."""
        try:
            return function(*args)
        except MedLoRAError as exc:
            slicer.util.errorDisplay(f"{what}: {exc}")
            self._status(f"{what} failed")
            return None

    def _ready(self):
        return self._run(_("Installing dependencies"), self.logic.ensureDependencies,
                         slicer.util.confirmOkCancelDisplay)

    def _busy(self):
        """Only one job at a time: the running one is finished or cancelled first."""
        if self._job is not None:
            slicer.util.errorDisplay(_("MedLoRA is still working ({status}); wait, or press Cancel.").format(
                status=self.logic.jobStatus(self._job)))
        return self._job is not None

    def _start(self, job, status):
        self._job = job
        self.ui.cancelButton.enabled = True
        self._status(status)
        self._timer.start()

    def refreshAdapters(self):
        names = self._run(_("Listing adapters"), self.logic.adapterNames) or []
        self.ui.adapterComboBox.clear()
        self.ui.adapterComboBox.addItems(names)

    # --- scoring -----------------------------------------------------------------------
    def onAdapterChanged(self, name):
        if name:
            info = self._run(_("Adapter"), self.logic.adapterInfo, name)
            self.ui.adapterInfoLabel.text = info or ""

    def onScore(self):
        if self._busy() or not self._ready():
            return
        p = self._parameterNode
        job = self._run(_("Scoring"), self.logic.beginScore, p.inputVolume, p.inputMarkups,
                        self.ui.adapterComboBox.currentText, p.resultsTable, p.testTimeAugmentation, p.device)
        if job:
            self._start(job, _("Scoring…"))

    def onScoreAll(self):
        if self._busy() or not self._ready():
            return
        job = self._run(_("Scoring all studies"), self.logic.beginScoreAll, self.ui.adapterComboBox.currentText,
                        self._askMarkups, self._parameterNode.device)
        if job:
            self.ui.trainingProgressBar.maximum = max(1, len(job.studies))
            self._start(job, _("Scoring all loaded studies…"))

    def _askMarkups(self, volume, candidates):
        names = [node.GetName() for node in candidates]
        name = qt.QInputDialog.getItem(slicer.util.mainWindow(), _("MedLoRA"),
                                       _("Points to score on {name}:").format(name=volume.GetName()), names, 0, False)
        return candidates[names.index(name)] if name in names else None

    def onResultClicked(self, index):
        """Centre the slice views on the nodule of the clicked row."""
        position = self._run(_("Results"), result_position_ras, self._parameterNode.resultsTable, index.row())
        if position is not None:  # rows of studies without points have no position
            slicer.modules.markups.logic().JumpSlicesToLocation(*position, True)

    def onExportCsv(self):
        table = self._parameterNode.resultsTable
        path = qt.QFileDialog.getSaveFileName(None, _("Export results"), "medlora-results.csv", "CSV (*.csv)")
        if table and path:
            self._run(_("Export"), export_csv, read_table(table), path)

    def onCube(self):
        p = self._parameterNode
        adapter = self.ui.adapterComboBox.currentText
        preview = self._run(_("Crop"), self.logic.cropPreview, p.inputVolume, p.inputMarkups, adapter)
        if preview:
            self.ui.thumbnailLabel.setPixmap(qt.QPixmap(str(preview)))
            cube = self._run(_("Crop"), self.logic.showCube, p.inputVolume, p.inputMarkups, adapter)
            if cube:
                slicer.util.setSliceViewerLayers(background=cube, fit=True)

    def onExportCrops(self):
        folder = qt.QFileDialog.getExistingDirectory(None, _("Export crops to"))
        if folder:
            export = self._run(_("Export crops"), self.logic.exportCrops, folder, self.ui.adapterComboBox.currentText,
                               self._parameterNode.inputVolume, self._parameterNode.inputMarkups)
            if export:
                self._status(_("{n} crops and index.csv written to {folder}").format(n=export.written, folder=folder)
                             + "".join(f"\n{line}" for line in export.skipped))

    # --- training ----------------------------------------------------------------------
    def onLabel(self, label):
        markups = self._parameterNode.inputMarkups
        index = markups.GetDisplayNode().GetActiveControlPoint() if markups else -1
        if markups is None or index < 0:
            slicer.util.errorDisplay(_("Click a control point of the selected point list first."))
            return
        mrml.set_training_label(markups, markups.GetNthControlPointID(index), label)
        self._status(_("{point} labelled {label}").format(point=markups.GetNthControlPointLabel(index),
                                                         label=("benign", "malignant")[label]))

    def onStartTraining(self):
        if self._busy() or not self._ready():
            return
        p = self._parameterNode
        config = TrainingConfig(name=p.adapterName, backbone=p.backbone, epochs=p.epochs, rank=p.rank)
        job = self._run(_("Training"), self.logic.startTraining, config, p.inputVolume, p.inputMarkups)
        if job:
            self.ui.plotWidget.setMRMLPlotChartNode(job.chart_node)
            self.ui.trainingProgressBar.maximum = 100
            self._start(job, _("Training started"))

    # --- progress ------------------------------------------------------------------------
    def _stopPolling(self):
        self._timer.stop()
        self._job = None
        self.ui.cancelButton.enabled = False

    def onTimer(self):
        job = self._job
        try:
            finished = self.logic.pollJob(job)
        except MedLoRAError as exc:
            self._stopPolling()
            slicer.util.errorDisplay(str(exc))
            return
        except Exception:
            self._stopPolling()  # report it once (Slicer's console), not on every tick
            raise
        self.ui.trainingProgressBar.value = self.logic.jobProgress(job, self.ui.trainingProgressBar.maximum)
        self.ui.trainingStatusLabel.text = self.logic.jobStatus(job)
        if finished:
            self._stopPolling()
            table = self.logic.jobResultsTable(job)
            if table is not None:
                self._parameterNode.resultsTable = table
                self.ui.resultsTableView.setMRMLTableNode(table)
            self._status(self.logic.jobStatus(job))
            self.refreshAdapters()

    def onCancel(self):
        if self._job is not None:
            self._run(_("Cancel"), self.logic.cancelJob, self._job)
            self._status(_("Cancelled"))

    # --- adapters and engine -------------------------------------------------------------
    def onImportAdapter(self):
        path = qt.QFileDialog.getOpenFileName(None, _("Import adapter"), "", "Adapter (*.zip manifest.json)")
        if path:
            self._run(_("Import"), self.logic.importAdapter, path)
            self.refreshAdapters()

    def onExportAdapter(self):
        name = self.ui.adapterComboBox.currentText
        path = qt.QFileDialog.getSaveFileName(None, _("Export adapter"), f"{name}.zip", "Adapter (*.zip)")
        if name and path:
            self._run(_("Export"), self.logic.exportAdapter, name, path)

    def onDeleteAdapter(self):
        name = self.ui.adapterComboBox.currentText
        if name and slicer.util.confirmYesNoDisplay(_("Delete adapter {name}?").format(name=name)):
            self._run(_("Delete"), self.logic.deleteAdapter, name)
            self.refreshAdapters()

    def onRestartEngine(self):
        self.logic.restartEngine(self._parameterNode.device)
        self._status(_("Scoring engine restarted"))


class MedLoRALogic(ScriptedLoadableModuleLogic, ModuleLogic):
    """Slicer's logic class: the library's ``ModuleLogic`` plus the parameter node."""

    def __init__(self, scene=None, engine=None, runner=None, store=None, workDir=None):
        ScriptedLoadableModuleLogic.__init__(self)
        ModuleLogic.__init__(self, scene or slicer.mrmlScene, engine=engine, runner=runner, store=store,
                             workDir=workDir, libraryRoot=LIB_ROOT)

    def getParameterNode(self):
        return MedLoRAParameterNode(super().getParameterNode())


class MedLoRATest(ScriptedLoadableModuleTest):
    """Runs in Slicer (``Slicer --no-main-window --python-code "…runTest()"``): synthetic CT, engine, training."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_score_and_train()

    def test_score_and_train(self):
        import tempfile

        from MedLoRALib.adapters.store import AdapterStore
        from MedLoRALib.slicer import selftest

        with tempfile.TemporaryDirectory() as folder:
            # The module's logic: its engine settings find MedLoRALib in developer mode too.
            logic = MedLoRALogic(store=AdapterStore(os.path.join(folder, "store")), workDir=folder)
            report = selftest.run(slicer.mrmlScene, folder, logic=logic.sceneLogic)
        self.assertEqual(report["rows"], report["points"])
        self.assertEqual(report["scored"], report["points"])
        self.assertTrue(report["adapter_registered"])
        self.assertTrue(report["random_init_flagged"])
        self.assertTrue(all("(random-init)" in label for label in report["labels"]), report["labels"])
        self.assertEqual(report["epochs_plotted"], report["epochs"])
