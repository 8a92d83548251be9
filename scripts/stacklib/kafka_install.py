"""Installing Kafka for the stack: Java, Maven, and the official Apache Kafka jars from
Maven Central (``scripts/kafka/pom.xml`` pins the version), cached in CACHE_DIR."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from .common import CACHE_DIR, ROOT, StackError, cache_lock, require_command, run_logged, say, tail

__all__ = ["MIN_JAVA", "POM", "ensure_jars", "ensure_java", "ensure_maven", "kafka_version",
           "libs_dir"]

POM = ROOT / "scripts" / "kafka" / "pom.xml"
MIN_JAVA = 17


def kafka_version() -> str:
    """The Kafka version pinned in scripts/kafka/pom.xml."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    try:
        node = ET.parse(POM).getroot().find("m:properties/m:kafka.version", ns)
    except (OSError, ET.ParseError) as exc:
        raise StackError(f"cannot read the Kafka version from {POM}: {exc}") from exc
    if node is None or not (node.text or "").strip():
        raise StackError(f"{POM} has no <kafka.version> property")
    return (node.text or "").strip()


def libs_dir() -> Path:
    return CACHE_DIR / f"kafka-{kafka_version()}" / "libs"


def _java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        raise StackError(f"cannot tell the Java version from `{java} -version`: {out.stderr!r}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def ensure_java() -> str:
    java = require_command("java", "default-jre-headless", "Java (needed by Kafka)")
    if (major := _java_major(java)) < MIN_JAVA:
        raise StackError(f"Kafka needs Java {MIN_JAVA} or newer, {java} is Java {major}")
    return java


def ensure_maven() -> str:
    return require_command("mvn", "maven", "Maven (used to fetch the Kafka jars)")


def ensure_jars() -> Path:
    """Fetch the Kafka jars with Maven unless a complete download is already cached."""
    libs = libs_dir()
    marker = libs.parent / "jars.complete"
    if marker.exists():
        return libs
    with cache_lock():  # another stack instance may be downloading them right now
        if marker.exists():
            return libs
        return _download_jars(libs, marker)


def _download_jars(libs: Path, marker: Path) -> Path:
    ensure_java()
    mvn = ensure_maven()
    log = CACHE_DIR / "mvn.log"
    say(f"downloading Kafka {kafka_version()} jars from Maven Central (log {log})")
    shutil.rmtree(libs, ignore_errors=True)
    try:
        run_logged(
            [mvn, "-B", "-ntp", "-f", str(POM), "dependency:copy-dependencies",
             f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
            log, "downloading the Kafka jars with Maven", timeout=1200,
        )
    except StackError as exc:
        raise StackError(f"{exc}\nCan this machine reach https://repo.maven.apache.org? "
                         "`scripts/stack up` retries the download.") from None
    if not (libs / f"kafka_2.13-{kafka_version()}.jar").exists():
        raise StackError(f"Maven finished but {libs} lacks the Kafka jar; log {log}:\n{tail(log)}")
    marker.write_text(f"{len(list(libs.glob('*.jar')))} jars\n")
    return libs
