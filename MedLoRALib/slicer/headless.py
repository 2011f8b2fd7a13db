"""Slicer's scripted-module bases for when only ``slicer-core`` is installed (CI, scripts).

``slicer-core`` has MRML and the module logics but no Qt, no ``slicer.app`` and no
``ScriptedLoadableModule`` base classes. The stand-ins here follow what Slicer's own code does
at every supported tag (v5.4.0 to main), so a module that works on them has been held to
Slicer's rules, not to rules of our own; ``docs/slicer-compat.md`` lists each rule with its
place in Slicer's source. Written from reading that source, not copied from it.

What is not here: the widget and GUI binding (``connectGui``) need Qt and refuse to start.
"""

from __future__ import annotations

import pathlib
import typing
import unittest
from typing import Annotated, Any

SINGLETON_CLASS = "vtkMRMLScriptedModuleNode"


def tr(text: str) -> str:
    """Slicer's translation function (``slicer.i18n.tr``, from 5.4), untranslated."""
    return text


class ScriptedLoadableModule:
    """``Base/Python/slicer/ScriptedLoadableModule.py`` (v5.4.0): keeps ``parent``, names the module."""

    def __init__(self, parent) -> None:
        self.parent = parent
        self.moduleName = type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        raise RuntimeError("the MedLoRA widget needs 3D Slicer's application (Qt); use MedLoRALogic headless")


class ScriptedLoadableModuleLogic:
    """Slicer's ``ScriptedLoadableModuleLogic`` as ``Base/Python/slicer/ScriptedLoadableModule.py`` has it.

    Same at v5.4.0, v5.6.0, v5.8.0, v5.10.0, v5.12.0 and main:

    * ``__init__(self, parent=None)`` calls ``super().__init__()`` with no arguments: in a class
      that also inherits another base, the next class in the MRO is initialised without any of
      its arguments (and ``parent`` is dropped);
    * the module name is the class name without a trailing ``Logic``;
    * ``getParameterNode`` returns the scene's singleton ``vtkMRMLScriptedModuleNode`` tagged with
      the module name (creating it on first use) in the *global* ``slicer.mrmlScene``, not in a
      scene the logic was given.
    """

    def __init__(self, parent=None) -> None:
        super().__init__()
        name = type(self).__name__
        self.moduleName = name[:-len("Logic")] if name.endswith("Logic") else name
        self.isSingletonParameterNode = True

    def getParameterNode(self):  # noqa: N802 - Slicer's name
        import slicer

        scene = slicer.mrmlScene
        if self.isSingletonParameterNode:
            node = scene.GetSingletonNode(self.moduleName, SINGLETON_CLASS)
            if node:
                if node.GetAttribute("ModuleName") != self.moduleName:  # removed by a scene close
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
        else:
            for node in self.getAllParameterNodes():
                return node
        return scene.AddNode(self.createParameterNode())

    def getAllParameterNodes(self) -> list:  # noqa: N802 - Slicer's name
        import slicer

        scene = slicer.mrmlScene
        nodes = (scene.GetNthNodeByClass(i, SINGLETON_CLASS) for i in range(scene.GetNumberOfNodesByClass(SINGLETON_CLASS)))
        return [node for node in nodes if node.GetAttribute("ModuleName") == self.moduleName]

    def createParameterNode(self):  # noqa: N802 - Slicer's name
        import slicer

        scene = slicer.mrmlScene
        if scene is None:
            return None
        node = scene.CreateNodeByClass(SINGLETON_CLASS)
        node.UnRegister(None)  # Python owns it now, as in Slicer
        if self.isSingletonParameterNode:
            node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(scene.GenerateUniqueName(self.moduleName))
        return node


ScriptedLoadableModuleTest = unittest.TestCase


# --- parameterNodeWrapper ------------------------------------------------------------------------
# Base/Python/slicer/parameterNodeWrapper/ (wrapper.py, serializers.py, validators.py, util.py),
# v5.4.0 to main. Only the types MedLoRA's parameter node uses are supported; others raise.


class Choice:
    """``validators.Choice``: the value must be one of ``choices``."""

    def __init__(self, choices) -> None:
        self.choices = choices

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class WithinRange:
    """``validators.WithinRange``: ``minimum <= value <= maximum``."""

    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


class Default:
    """``default.Default``: a default given as an annotation instead of ``= value``."""

    def __init__(self, value) -> None:
        self.value = value


_PATHS = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
          pathlib.PureWindowsPath)


def _is_node_class(type_) -> bool:
    import slicer

    return isinstance(type_, type) and issubclass(type_, slicer.vtkMRMLNode)


def _split(annotated) -> tuple[Any, tuple]:
    """``Annotated[T, a, b]`` → ``(T, (a, b))``; anything else → ``(T, ())`` (``util.splitAnnotations``)."""
    args = typing.get_args(Annotated[annotated, "marker"])
    return args[0], tuple(args[1:-1])


def node_types(annotation) -> tuple[str, ...]:
    """The node class names a ``qMRMLNodeComboBox`` bound to this parameter will offer.

    As ``util.getNodeTypes`` (v5.4.0 to main), which the combo box connector calls when the GUI
    is connected: each node class in the annotation (a node class, or a ``Union`` of node classes
    and ``None``) is *instantiated* to ask its ``GetClassName()``, so an abstract class such as
    ``vtkMRMLMarkupsNode`` fails there (its Python constructor raises ``TypeError``).
    """
    type_, _ = _split(annotation)
    if _is_node_class(type_):
        return (type_().GetClassName(),)
    if typing.get_origin(type_) is typing.Union:
        members = [_split(arg)[0] for arg in typing.get_args(type_)]
        return tuple(member().GetClassName() for member in members if _is_node_class(member))
    raise TypeError(f"Cannot handle type {annotation}")


class _Serializer:
    """One parameter's storage on a ``vtkMRMLScriptedModuleNode``, in Slicer's format."""

    def __init__(self, type_, validators: list) -> None:
        self.type, self.validators = type_, validators

    def default(self):
        return {str: "", int: 0, float: 0.0, bool: False}.get(self.type, self.type() if self.type in _PATHS else None)

    def validate(self, value) -> None:
        # serializers.*Serializer.create: NotNone + IsInstance, node parameters IsInstance only (None allowed)
        if self.type is type(None):
            if value is not None:
                raise TypeError(f"Value must be None, is {value!r}")
        elif value is None:
            if not _is_node_class(self.type):
                raise ValueError("Value must not be None")
        elif not isinstance(value, (int, float) if self.type is float else self.type):
            raise TypeError(f"Value must be of type '{self.type}', is type '{type(value)}' value '{value}'")
        for validator in self.validators:
            validator.validate(value)

    def can_hold(self, value) -> bool:
        if self.type is type(None):
            return value is None
        return value is not None and isinstance(value, self.type)

    def is_in(self, node, name: str) -> bool:
        return bool(node.HasParameter(name))

    def write(self, node, name: str, value) -> None:
        self.validate(value)
        if _is_node_class(self.type):
            node.SetParameter(name, "")  # so is_in finds a None reference (NodeSerializer.write)
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif self.type is bool or self.type is type(None):
            node.SetParameter(name, "True" if value or value is None else "False")
        else:
            node.SetParameter(name, str(value))

    def read(self, node, name: str):
        if _is_node_class(self.type):
            return node.GetNodeReference(name)
        if self.type is type(None):
            return None
        text = node.GetParameter(name)
        return text == "True" if self.type is bool else self.type(text)

    def remove(self, node, name: str) -> None:
        node.UnsetParameter(name)
        if _is_node_class(self.type):
            node.RemoveNodeReferenceIDs(name)


class _UnionSerializer:
    """``serializers.UnionSerializer``: member ``i`` is stored under ``name.i``.

    A value goes to the first member that can hold it; with no ``None`` member, ``None`` fits none
    and is refused with ``TypeError`` -- also as the default, which is ``None`` for a union of
    nodes, so ``Union[NodeA, NodeB]`` without a default fails when the wrapper is created.
    ``Optional[X]`` (``Union[X, None]``) defaults to ``None``.
    """

    def __init__(self, members: list[_Serializer]) -> None:
        self.members = members

    def default(self):
        if len(self.members) == 2 and self.members[1].type is type(None):
            return None
        return self.members[0].default()

    def is_in(self, node, name: str) -> bool:
        return any(m.is_in(node, f"{name}.{i}") for i, m in enumerate(self.members))

    def write(self, node, name: str, value) -> None:
        error = None
        for index, member in enumerate(self.members):
            if member.can_hold(value):
                try:
                    member.validate(value)
                except (TypeError, ValueError) as exc:
                    error = exc
                    continue
                self.remove(node, name)
                member.write(node, f"{name}.{index}", value)
                return
        raise error or TypeError(f"Unable to write value '{value}' of type '{type(value)}'")

    def read(self, node, name: str):
        for index, member in enumerate(self.members):
            if member.is_in(node, f"{name}.{index}"):
                return member.read(node, f"{name}.{index}")
        raise KeyError(f"Unable to find value for name: {name}")

    def remove(self, node, name: str) -> None:
        for index, member in enumerate(self.members):
            member.remove(node, f"{name}.{index}")


def _serializer(annotation):
    type_, annotations = _split(annotation)
    validators = [a for a in annotations if hasattr(a, "validate")]
    if typing.get_origin(type_) is typing.Union:
        return _UnionSerializer([_serializer(arg) for arg in typing.get_args(type_)])
    if type_ in (str, int, float, bool, type(None)) or type_ in _PATHS or _is_node_class(type_):
        return _Serializer(type_, validators)
    raise TypeError(f"the headless parameterNodeWrapper does not support {annotation!r}")


def parameterNodeWrapper(classtype=None):  # noqa: N802 - Slicer's name
    """``slicer.parameterNodeWrapper.parameterNodeWrapper`` on a real ``vtkMRMLScriptedModuleNode``.

    As ``wrapper._processClass`` / ``_initMethod``: the annotations (``typing.get_type_hints``
    with extras) become properties; ``Wrapper(parameterNode)`` writes each missing parameter's
    default through its validators (so a default outside ``WithinRange`` or a ``None`` default
    of a ``Union`` without ``None`` fails there); writes are validated. One deliberate
    difference: ``node_types`` runs for every node parameter when the class is decorated,
    because headless there is no GUI connection, which is where Slicer runs it (the module binds
    every node parameter to a ``qMRMLNodeComboBox``; ``test_slicer_compat`` checks that).
    Values are read from the node each time (Slicer caches them and refreshes on Modified).
    """

    def wrap(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        parameters = {}
        for name, annotation in hints.items():
            serializer = _serializer(annotation)
            type_, annotations = _split(annotation)
            if _is_node_class(type_) or typing.get_origin(type_) is typing.Union and any(
                    _is_node_class(_split(a)[0]) for a in typing.get_args(type_)):
                node_types(annotation)
            defaults = [a.value for a in annotations if isinstance(a, Default)]
            default = getattr(cls, name) if hasattr(cls, name) else defaults[0] if defaults else serializer.default()
            parameters[name] = (serializer, default)
            setattr(cls, name, property(lambda self, n=name: self.getValue(n),
                                        lambda self, value, n=name: self.setValue(n, value)))

        def __init__(self, parameterNode, prefix: str | None = None):  # noqa: N807
            self.parameterNode = parameterNode
            self._prefix = prefix or ""
            for name, (serializer, default) in parameters.items():
                if not serializer.is_in(parameterNode, self._prefix + name):
                    serializer.write(parameterNode, self._prefix + name, default)

        def getValue(self, name):  # noqa: N802
            serializer, default = _parameter(name)
            key = self._prefix + name
            if not serializer.is_in(self.parameterNode, key):
                serializer.write(self.parameterNode, key, default)
            return serializer.read(self.parameterNode, key)

        def setValue(self, name, value):  # noqa: N802
            _parameter(name)[0].write(self.parameterNode, self._prefix + name, value)

        def _parameter(name):
            if name not in parameters:
                raise ValueError(f"Cannot find a param with the given name: {name}")
            return parameters[name]

        def connectGui(self, gui):  # noqa: N802
            raise RuntimeError("connectGui needs 3D Slicer's application (Qt)")

        cls.allParameters = dict(parameters)
        cls.__init__ = __init__
        cls.getValue, cls.setValue = getValue, setValue
        cls.default = lambda self, name: Default(_parameter(name)[1])  # wrapper._default: a Default
        cls.connectGui = connectGui
        cls.disconnectGui = lambda self, tag: None
        cls.StartModify = lambda self: self.parameterNode.StartModify()
        cls.EndModify = lambda self, wasModified: self.parameterNode.EndModify(wasModified)
        cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
            event, callback, priority)
        cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
        cls.Modified = lambda self: self.parameterNode.Modified()
        return cls

    return wrap if classtype is None else wrap(classtype)

