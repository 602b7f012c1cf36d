"""Access and resources: DICOM TLS, peer allowlists, a full disk, and refusal below the free-space floor."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from peers import LungScreen, free_port, needs_binary, needs_netns, storescp, storescu, wait_until
from test_end_to_end import phantom_study

pytestmark = [pytest.mark.slow, needs_binary("storescu", "openssl")]


def make_certificate(folder: Path, name: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A self-signed (or CA-signed) certificate for 127.0.0.1, made with openssl for this test."""
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subject = ["-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1"]
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key,
                        "-out", cert, *subject], check=True, capture_output=True)
    else:
        csr = folder / f"{name}.csr"
        subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                        *subject], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
                        "-days", "1", "-out", cert, "-copy_extensions", "copy"], check=True, capture_output=True)
    return key, cert


def echo(port: int, tls: ssl.SSLContext | None = None) -> bool:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGSCREEN", tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


def test_dicom_tls_with_client_certificates(tmp_path):
    ca = make_certificate(tmp_path, "test-ca")
    server_key, server_cert = make_certificate(tmp_path, "lungscreen", ca)
    client_key, client_cert = make_certificate(tmp_path, "pacs", ca)
    stranger_key, stranger_cert = make_certificate(tmp_path, "stranger")
    server = LungScreen(tmp_path, config={"tls_cert": str(server_cert), "tls_key": str(server_key), "tls_ca": str(ca[1])})
    with server.running():
        assert not echo(server.port), "plain TCP is not accepted on a TLS listener"

        def client(cert: Path, key: Path) -> ssl.SSLContext:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca[1]))
            context.load_cert_chain(cert, key)
            return context

        assert echo(server.port, client(client_cert, client_key))
        assert not echo(server.port, client(stranger_cert, stranger_key)), "a certificate not signed by the CA"
        study = phantom_study(tmp_path / "study")
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="LUNGSCREEN",
                             tls_args=(client(client_cert, client_key), "127.0.0.1"))
        assert all(assoc.send_c_store(path).Status == 0 for path in study.paths)
        assoc.release()
        assert server.wait_for_state(study.study_instance_uid, ("reported",), timeout=60)["instances"] == 40


@needs_netns
def test_reports_go_to_a_tls_destination_that_checks_our_certificate(tmp_path):
    """dcmtk storescp over TLS (BCP 195 profile) requires a client certificate signed by the CA;
    a destination whose certificate the CA did not sign gets nothing, and the log says why."""
    ca = make_certificate(tmp_path, "test-ca")
    pacs_key, pacs_cert = make_certificate(tmp_path, "pacs", ca)
    our_key, our_cert = make_certificate(tmp_path, "lungscreen", ca)
    impostor_key, impostor_cert = make_certificate(tmp_path, "impostor")
    study = phantom_study(tmp_path / "study")
    trusted, impostor = free_port(), free_port()
    tls_options = ("+tls", str(pacs_key), str(pacs_cert), "+cf", str(ca[1]))
    impostor_options = ("+tls", str(impostor_key), str(impostor_cert), "+cf", str(ca[1]))
    with storescp(tmp_path / "received", trusted, "PACS", log_path=tmp_path / "pacs.log", options=tls_options), \
            storescp(tmp_path / "impostor", impostor, "PACS", log_path=tmp_path / "impostor.log",
                     options=impostor_options):
        server = LungScreen(
            tmp_path, idle_seconds=0.5,
            destinations=[f"tls:PACS@127.0.0.1:{trusted}", f"tls:PACS@127.0.0.1:{impostor}"],
            config={"destination_ca": str(ca[1]), "destination_cert": str(our_cert), "destination_key": str(our_key),
                    "max_delivery_attempts": 1},
        )
        with server.running():
            storescu(list(study.paths), server.port)

            def settled():  # every delivery sent or dead-lettered
                job = server.study(study.study_instance_uid)
                return job if job["deliveries"] and {d["state"] for d in job["deliveries"]} <= {"sent", "dead"} else None

            job = wait_until(settled, 60, what="deliveries settled")
    sent = [d for d in job["deliveries"] if d["destination"] == f"tls:PACS@127.0.0.1:{trusted}"]
    failed = [d for d in job["deliveries"] if d["destination"] == f"tls:PACS@127.0.0.1:{impostor}"]
    assert len(sent) == len(failed) == 2, job["deliveries"]  # the SR and the presentation state
    assert {d["state"] for d in sent} == {"sent"}, sent
    assert sorted(p.name[:2] for p in (tmp_path / "received").iterdir()) == ["PS", "SR"]
    assert {d["state"] for d in failed} == {"dead"}, failed
    assert all("could not be reached over TLS" in d["last_error"] for d in failed), failed
    assert job["state"] == "failed" and "dead-lettered" in job["reason"], job
    assert not list((tmp_path / "impostor").iterdir())
    assert "CERTIFICATE_VERIFY_FAILED" in server.log()


def test_peer_address_allowlist(tmp_path):
    study = phantom_study(tmp_path / "study")
    server = LungScreen(tmp_path, config={"allow_host": ["127.0.0.9"]})
    with server.running():
        assert storescu(list(study.paths[:1]), server.port, check=False).returncode != 0
        assert server.study(study.study_instance_uid) is None
    assert "address not in the allowlist" in server.log()


def test_low_disk_refuses_new_associations_with_a_clear_reason(tmp_path):
    study = phantom_study(tmp_path / "study")
    free_mb = shutil.disk_usage(tmp_path).free // 1024**2
    server = LungScreen(tmp_path, config={"min_free_mb": free_mb + 1_000_000})
    with server.running():
        assert storescu(list(study.paths[:1]), server.port, check=False).returncode != 0
        assert not list((server.data_dir / "images").rglob("*.dcm"))
    assert "refused: less than" in server.log() and "MiB free in the data folder" in server.log()


def test_disk_full_mid_study_refuses_instances_and_keeps_what_was_acknowledged(tmp_path):
    """A real ENOSPC: the server runs with its data folder on a 4 MiB tmpfs (its own mount namespace)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("needs root to create a mount namespace")
    small = phantom_study(tmp_path / "small")
    big = phantom_study(tmp_path / "big", shape=(40, 256, 256), spheres=())  # 5 MiB: does not fit
    server = LungScreen(tmp_path, idle_seconds=0.5, config={"min_free_mb": 0})
    server.data_dir.mkdir(parents=True)
    server.args = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs -o size=4m tmpfs "{server.data_dir}" && exec "$0" "$@"', *server.args]
    with server.running():
        storescu(list(small.paths), server.port)
        server.wait_for_state(small.study_instance_uid, ("reported",), timeout=60)
        result = storescu(list(big.paths), server.port, check=False)
        assert "Out of Resources" in result.stdout + result.stderr or result.returncode != 0
        job = server.study(big.study_instance_uid)
        stored = job["instances"] if job else 0
        assert stored < 40
        assert server.study(small.study_instance_uid)["state"] == "reported", "existing data untouched"
        # what was acknowledged is intact; nothing half-written is visible
        listing = subprocess.run(["nsenter", "-t", str(server.proc.pid), "-m", "sh", "-c",
                                  f'find "{server.data_dir}/images" -name "*.dcm" | wc -l; '
                                  f'find "{server.data_dir}/images" -name "*.part" | wc -l'],
                                 capture_output=True, text=True)
        if listing.returncode == 0:
            dcm_count, part_count = (int(v) for v in listing.stdout.split())
            assert dcm_count == 40 + stored and part_count == 0
        assert server.proc.poll() is None, "the server stays up"
    assert "cannot store instance" in server.log()


def test_read_only_data_folder_refuses_new_associations(tmp_path):
    """The image store's file system is remounted read-only under the running server (the
    database, which keeps files open for writing, stays where it is)."""
    if subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("needs root to create a mount namespace")
    first, second = phantom_study(tmp_path / "first"), phantom_study(tmp_path / "second")
    server = LungScreen(tmp_path, idle_seconds=0.5, config={"min_free_mb": 0})
    images = server.data_dir / "images"
    images.mkdir(parents=True)
    server.args = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount -t tmpfs -o size=64m tmpfs "{images}" && exec "$0" "$@"', *server.args]
    with server.running():
        storescu(list(first.paths), server.port)
        server.wait_for_state(first.study_instance_uid, ("reported",), timeout=60)
        remount = subprocess.run(["nsenter", "-t", str(server.proc.pid), "-m", "mount", "-o", "remount,ro",
                                  str(images)], capture_output=True, text=True)
        assert remount.returncode == 0, remount.stderr
        wait_until(lambda: storescu(list(second.paths[:1]), server.port, check=False).returncode != 0, 10,
                   what="refusal")
        assert server.study(first.study_instance_uid)["state"] == "reported", "existing data untouched"
        assert server.proc.poll() is None
    assert "refused: the data folder is not writable" in server.log()
