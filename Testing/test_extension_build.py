"""The Slicer extension build files, without a Slicer SDK.

(a) every file AnatSSL/CMakeLists.txt lists exists, and every file of the module's sub-packages is
    listed (unlisted files are silently left out of the extension package);
(b) the extension configures with the real ``cmake`` against a stub ``SlicerConfig.cmake`` that
    mimics the Slicer macros, and the staged and installed ``qt-scripted-modules`` tree has the
    layout the module expects at run time (SLICER.md section 3);
(c) every module file and the Slicer self-test compile;
plus the icon is a 128x128 PNG and the .ui parses with the four tool tabs.
"""

from __future__ import annotations

import os
import py_compile
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "AnatSSL"
LIB_DIR = "lib/Slicer-5.12/qt-scripted-modules"


def _cmake_list(text: str, variable: str) -> list[str]:
    """Entries of ``set(<variable> ...)`` in CMake source ``text`` (comments dropped)."""
    text = re.sub(r"#[^\n]*", "", text)
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def _module_cmake() -> str:
    return (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")


def _expand(entry: str) -> str:
    return entry.replace("${MODULE_NAME}", "AnatSSL")


# ---- (a) listed files -------------------------------------------------------------------------
def test_listed_scripts_and_resources_exist():
    scripts = [_expand(s) for s in _cmake_list(_module_cmake(), "MODULE_PYTHON_SCRIPTS")]
    resources = [_expand(r) for r in _cmake_list(_module_cmake(), "MODULE_PYTHON_RESOURCES")]
    assert "AnatSSL.py" in scripts and "AnatSSLBridge/__init__.py" in scripts
    assert set(resources) == {"../Resources/Icons/AnatSSL.png", "../Resources/UI/AnatSSL.ui"}
    missing = [p for p in scripts + resources if not (MODULE_DIR / p).is_file()]
    assert missing == []


def test_every_subpackage_file_is_listed():
    scripts = {_expand(s) for s in _cmake_list(_module_cmake(), "MODULE_PYTHON_SCRIPTS")}
    on_disk = {
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert "AnatSSLBridge/volumes.py" in on_disk
    assert on_disk - scripts == set(), "module files missing from MODULE_PYTHON_SCRIPTS"
    # module discovery is non-recursive: only module files may sit directly in AnatSSL/
    loose = {p for p in on_disk if "/" not in p}
    assert loose <= {"AnatSSL.py", "SegmentEditorAnatSSL.py"}


def test_top_level_metadata():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"cmake_minimum_required\(VERSION 3\.\d+(\.\d+)?\.\.\.3\.\d+", text)
    assert re.search(r"project\(AnatSSL\)", text)
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "https://raw.githubusercontent.com/anatssl/SlicerAnatSSL/main/Resources/Icons/AnatSSL.png" in text
    order = [text.index(s) for s in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                                     "add_subdirectory(AnatSSL)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                                     "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order)


# ---- (b) configure against a stub Slicer ------------------------------------------------------
_SLICER_CONFIG = """
set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/CPack.cmake")
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "%(lib)s")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "%(lib)s")
"""

_USE_SLICER = r"""
set(STUB_MANIFEST "${CMAKE_BINARY_DIR}/stub_manifest.txt")
file(WRITE "${STUB_MANIFEST}" "")

macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "slicerMacroBuildScriptedModule: unknown arguments ${MY_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT MY_NAME)
    message(FATAL_ERROR "slicerMacroBuildScriptedModule: NAME is required")
  endif()
  foreach(f ${MY_SCRIPTS} ${MY_RESOURCES})
    if(IS_ABSOLUTE "${f}" OR f MATCHES "^\\.\\.")
      message(FATAL_ERROR "slicerMacroBuildScriptedModule: ${f} is not inside the module folder")
    endif()
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${f}")
      message(FATAL_ERROR "slicerMacroBuildScriptedModule: listed file ${f} does not exist")
    endif()
    configure_file("${CMAKE_CURRENT_SOURCE_DIR}/${f}"
      "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${f}" COPYONLY)
    get_filename_component(_dir "${f}" DIRECTORY)
    install(FILES "${CMAKE_CURRENT_SOURCE_DIR}/${f}"
      DESTINATION "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${_dir}" COMPONENT RuntimeLibraries)
  endforeach()
  file(APPEND "${STUB_MANIFEST}" "module ${MY_NAME} generic_tests=${MY_WITH_GENERIC_TESTS}\n")
endmacro()

macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX;SLICER_ARGS" "" ${ARGN})
  if(NOT EXISTS "${MY_SCRIPT}" AND NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT}")
    message(FATAL_ERROR "slicer_add_python_unittest: ${MY_SCRIPT} does not exist")
  endif()
  get_filename_component(_test "${MY_SCRIPT}" NAME_WE)
  file(APPEND "${STUB_MANIFEST}" "unittest py_${_test}\n")
endmacro()
"""

_GENERATE_CONFIG = r"""
foreach(key HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)
  if("${EXTENSION_${key}}" STREQUAL "")
    message(FATAL_ERROR "EXTENSION_${key} is not set")
  endif()
  file(APPEND "${STUB_MANIFEST}" "EXTENSION_${key}=${EXTENSION_${key}}\n")
endforeach()
"""


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    if not (shutil.which("cc") or shutil.which("gcc")) or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C/C++ compiler: project(AnatSSL) enables C and CXX")
    tmp = tmp_path_factory.mktemp("extension")
    stub = tmp / "SlicerStub"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(_SLICER_CONFIG % {"lib": LIB_DIR}, encoding="utf-8")
    (stub / "UseSlicer.cmake").write_text(_USE_SLICER, encoding="utf-8")
    (stub / "GenerateConfig.cmake").write_text(_GENERATE_CONFIG, encoding="utf-8")
    (stub / "CPack.cmake").write_text('file(APPEND "${STUB_MANIFEST}" "cpack\\n")\n', encoding="utf-8")
    build, install = tmp / "build", tmp / "install"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="1")
    done = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={stub}", "-DBUILD_TESTING=ON"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = subprocess.run([cmake, "--install", str(build), "--prefix", str(install)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build, install


def _check_tree(tree: Path) -> None:
    assert (tree / "AnatSSL.py").is_file()
    assert (tree / "AnatSSLBridge" / "__init__.py").is_file()
    assert (tree / "AnatSSLBridge" / "segmentations.py").is_file()
    assert (tree / "SegmentEditorAnatSSL.py").is_file()
    assert (tree / "SegmentEditorAnatSSLLib" / "SegmentEditorEffect.py").is_file()
    assert (tree / "AnatSSLLib" / "__init__.py").is_file() and (tree / "AnatSSLLib" / "image.py").is_file()
    assert (tree / "Resources" / "UI" / "AnatSSL.ui").is_file()
    assert (tree / "Resources" / "Icons" / "AnatSSL.png").is_file()
    assert not list(tree.rglob("__pycache__")) and not list(tree.rglob("*.pyc"))
    # discovery loads every .py directly in the folder as a module: only module files may be there
    assert {p.name for p in tree.glob("*.py")} <= {"AnatSSL.py", "SegmentEditorAnatSSL.py"}


def test_configure_stages_the_module_tree(configured):
    build, _ = configured
    _check_tree(build / LIB_DIR)
    assert (build / LIB_DIR / "AnatSSLBridge" / "volumes.py").read_bytes() == (
        MODULE_DIR / "AnatSSLBridge" / "volumes.py"
    ).read_bytes()
    manifest = (build / "stub_manifest.txt").read_text(encoding="utf-8").splitlines()
    assert "module AnatSSL generic_tests=TRUE" in manifest
    assert "unittest py_AnatSSLSelfTest" in manifest
    assert "EXTENSION_DEPENDS=PyTorch" in manifest and "cpack" in manifest


def test_install_gives_the_same_tree(configured):
    _, install = configured
    _check_tree(install / LIB_DIR)


def _self_test_candidates():
    """``AnatSSL.selfTestCandidates`` without importing AnatSSL.py (it imports qt)."""
    import ast

    tree = ast.parse((MODULE_DIR / "AnatSSL.py").read_text(encoding="utf-8"))
    (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "selfTestCandidates"]
    func.args.defaults = []
    namespace = {"os": os}
    exec(compile(ast.Module(body=[func], type_ignores=[]), "AnatSSL.py", "exec"), namespace)
    return namespace["selfTestCandidates"]


def test_self_test_is_installed_where_reload_and_test_looks(configured):
    """Issue 29, defect 10: "Reload and Test" in an installed extension found no self-test."""
    build, install = configured
    candidates = _self_test_candidates()
    for tree in (build / LIB_DIR, install / LIB_DIR):
        shipped = tree / "Testing" / "Python" / "AnatSSLSelfTest.py"
        assert shipped.read_bytes() == (ROOT / "Testing" / "Python" / "AnatSSLSelfTest.py").read_bytes()
        first = next(p for p in candidates(str(tree)) if os.path.exists(p))
        assert Path(first) == shipped  # the installed copy, not one outside the extension
    # in a source checkout (developer mode) the repository's copy is found
    assert os.path.exists(next(p for p in candidates(str(MODULE_DIR)) if os.path.exists(p)))


# ---- (c) compile ------------------------------------------------------------------------------
def test_module_files_compile(tmp_path):
    files = sorted(p for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    files += sorted((ROOT / "Testing" / "Python").glob("*.py"))
    assert any(p.name == "AnatSSLSelfTest.py" for p in files)
    for n, path in enumerate(files):
        py_compile.compile(str(path), cfile=str(tmp_path / f"{n}.pyc"), doraise=True)


# ---- resources --------------------------------------------------------------------------------
def test_icon_is_a_128_pixel_png():
    data = (ROOT / "Resources" / "Icons" / "AnatSSL.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def test_ui_has_the_four_tool_tabs():
    root = ET.parse(ROOT / "Resources" / "UI" / "AnatSSL.ui").getroot()
    tabs = root.find(".//widget[@class='QTabWidget']")
    assert tabs is not None
    titles = [w.find("attribute[@name='title']/string").text for w in tabs.findall("widget")]
    assert titles == ["Landmarks", "Segmentation", "Search", "Advanced"]
    names = {w.get("name") for w in root.iter("widget")}
    assert {"encoderSelector", "deviceSelector", "toolsTabWidget", "progressBar", "cancelButton"} <= names
    # every field bound from the .ui is declared in the module's parameter node (see also test_ui_static.py)
    bound = [p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"]
    source = (MODULE_DIR / "AnatSSL.py").read_text(encoding="utf-8")
    for name in bound:
        assert re.search(rf"^\s+{name}\s*:", source, re.M), name
