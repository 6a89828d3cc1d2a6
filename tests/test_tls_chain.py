"""The certificate chain a client receives: the leaf and its intermediates, never the root.

A root in the chain cannot make a client trust anything (it must already trust the root)
and costs every full handshake its bytes; scanners flag it ("received certificate chain
contains the anchor certificate"). A real proxy serves an internal-CA site and a site with
a ``fullchain.pem`` that ends with its root; ``openssl s_client -showcerts`` shows what is
sent, curl checks that what is left still verifies up to the root.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from proxy.certs.store import served_chain
from tests.support import ProxyProcess, RawUpstream, curl

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def pki() -> tuple[trustme.CA, trustme.CA]:
    root = trustme.CA()
    return root, root.create_child_ca()


@pytest.fixture(scope="module")
def proxy(
    upstream: RawUpstream,
    pki: tuple[trustme.CA, trustme.CA],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyProcess]:
    directory = tmp_path_factory.mktemp("chain")
    root, intermediate = pki
    leaf = intermediate.issue_cert("files.test")
    chain = [blob.bytes() for blob in leaf.cert_chain_pems]  # leaf, intermediate
    (directory / "fullchain.pem").write_bytes(b"".join(chain) + root.cert_pem.bytes())
    (directory / "key.pem").write_bytes(leaf.private_key_pem.bytes())
    root.cert_pem.write_to_path(str(directory / "files-root.pem"))
    sites: list[dict[str, object]] = [
        {"hosts": ["app.test"], "upstreams": [upstream.url]},  # from the internal CA
        {
            "hosts": ["files.test"],
            "upstreams": [upstream.url],
            "cert": str(directory / "fullchain.pem"),
            "key": str(directory / "key.pem"),
        },
    ]
    running = ProxyProcess.start(directory, sites)
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


def received_chain(proxy: ProxyProcess, name: str, cafile: Path) -> list[x509.Certificate]:
    """The certificates the proxy sends for ``name``, in order; the chain must verify."""
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.https_port}", "-showcerts"]
    command += ["-servername", name, "-CAfile", str(cafile), "-verify_return_error"]
    done = subprocess.run(
        command,
        input=b"",
        capture_output=True,
        timeout=10,
        check=False,
    )
    output = done.stdout.decode()
    assert done.returncode == 0 and "Verify return code: 0 (ok)" in output, output
    return x509.load_pem_x509_certificates(done.stdout)


def subjects(certificates: list[x509.Certificate]) -> list[str]:
    return [c.subject.rfc4514_string() for c in certificates]


def test_internal_ca_sites_send_the_leaf_without_the_root(proxy: ProxyProcess) -> None:
    chain = received_chain(proxy, "app.test", proxy.root_ca)
    root = x509.load_pem_x509_certificate(proxy.root_ca.read_bytes())
    assert len(chain) == 1, subjects(chain)
    assert chain[0].issuer == root.subject != chain[0].subject
    assert curl(proxy, "app.test").stdout.startswith("raw upstream")  # --cacert root.pem


def test_a_fullchain_file_is_sent_without_its_self_signed_root(
    proxy: ProxyProcess, pki: tuple[trustme.CA, trustme.CA]
) -> None:
    root, intermediate = (x509.load_pem_x509_certificate(ca.cert_pem.bytes()) for ca in pki)
    root_file = proxy.directory / "files-root.pem"
    chain = received_chain(proxy, "files.test", root_file)
    assert subjects(chain[1:]) == subjects([intermediate]), subjects(chain)  # no root after it
    assert chain[0].issuer == intermediate.subject
    assert root.subject not in {c.subject for c in chain}
    reply = curl(proxy, "files.test", "/", "--cacert", str(root_file))  # the later --cacert wins
    assert reply.stdout.startswith("raw upstream")  # verified: the intermediate was sent


def test_only_a_self_signed_root_at_the_end_is_dropped(
    pki: tuple[trustme.CA, trustme.CA],
) -> None:
    root, intermediate = pki
    leaf = intermediate.issue_cert("x.test")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    assert served_chain(chain) == chain  # no root: the bytes as they were
    assert served_chain(chain + root.cert_pem.bytes()) == chain
    assert served_chain(root.cert_pem.bytes()) == root.cert_pem.bytes()  # a self-signed leaf
