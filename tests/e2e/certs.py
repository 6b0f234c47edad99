"""Test certificates made with the openssl command: a CA, and certificates it signs for 127.0.0.1 and
localhost, good for servers and clients alike."""
import subprocess


def openssl(directory, *args):
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def make_ca(directory, name):
    """A self-signed CA: `<name>.crt`, `<name>.key`."""
    openssl(directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-subj", f"/CN={name}", "-days", "1", "-out", f"{name}.crt")


def issue(directory, name, ca, sans="IP:127.0.0.1,DNS:localhost"):
    """`<name>.crt`/`<name>.key` signed by `ca`, for `sans` (openssl's form; 127.0.0.1 and localhost by
    default), server and client alike."""
    (directory / f"{name}.ext").write_text(
        f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl(directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr")
    openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
