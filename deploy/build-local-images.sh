#!/bin/sh
# Builds, on this host, the images deploy/compose.local.yml runs instead of the ones users
# pull: PostgreSQL and Orthanc from Debian's own packages, compacs from deploy/Dockerfile,
# all on a Debian base made here with mmdebstrap (no image registry needed: apt and pip
# reach their package registries as the host does). Needs root, podman and mmdebstrap.
#
#     deploy/build-local-images.sh          # builds what is missing, reuses the rest by tag
#
# Tags: localhost/compacs-debian-base:bookworm; localhost/compacs-postgres:15 and
# localhost/compacs-orthanc:1.10 (also tagged r-<hash of this script>), and
# localhost/compacs:local (also src-<hash of the sources>). An image is rebuilt only when
# its recipe or sources change; an older r-*/src-* image this script made is then removed.
set -eu
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/containers.conf}"

BASE=localhost/compacs-debian-base:bookworm
POSTGRES=localhost/compacs-postgres
ORTHANC=localhost/compacs-orthanc
COMPACS=localhost/compacs

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

have() { podman image exists "$1"; }
# retag REPO BUILT_TAG STABLE_TAG: point STABLE_TAG at BUILT_TAG, and remove the images of
# REPO that this script built before under another tag of the same kind (r-* or src-*).
retag() {
    kind=${2%%-*}
    for old in $(podman images --format '{{.Repository}}:{{.Tag}}' "$1" \
                 | grep ":$kind-" | grep -v ":$2\$" || true); do
        podman rmi "$old" >/dev/null 2>&1 || true
    done
    previous=$(podman image inspect --format '{{.Id}}' "$1:$3" 2>/dev/null || true)
    podman tag "$1:$2" "$1:$3"
    current=$(podman image inspect --format '{{.Id}}' "$1:$3")
    if [ -n "$previous" ] && [ "$previous" != "$current" ] \
            && [ -z "$(podman image inspect --format '{{.RepoTags}}' "$previous" | tr -d '[]')" ]; then
        podman rmi "$previous" >/dev/null 2>&1 || true  # only ever tagged $1:$3 here
    fi
}
recipe="r-$(sha256sum "$0" | cut -c1-12)"
say() { echo "build-local-images: $*" >&2; }
# podman build's own output goes to a log, shown only when the build fails.
build() {
    podman build "$@" > "$work/build.log" 2>&1 || {
        tail -n 60 "$work/build.log" >&2
        say "podman build $* failed"
        exit 1
    }
}

if ! have "$BASE"; then
    say "making $BASE with mmdebstrap"
    mmdebstrap --quiet --variant=minbase --include=ca-certificates bookworm "$work/rootfs.tar"
    podman import --quiet "$work/rootfs.tar" "$BASE" >/dev/null
    rm -f "$work/rootfs.tar"
fi

# Debian's packages start services in their postinst unless policy-rc.d says no.
NO_SERVICES='printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'

if ! have "$POSTGRES:$recipe"; then
    say "building $POSTGRES:$recipe"
    mkdir -p "$work/postgres"
    # The entrypoint honours what the postgres image users pull does: POSTGRES_USER,
    # POSTGRES_PASSWORD, POSTGRES_DB, data in /var/lib/postgresql/data.
    cat > "$work/postgres/entrypoint.sh" <<'SH'
#!/bin/sh
set -eu
bin=/usr/lib/postgresql/15/bin
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    [ -n "${POSTGRES_PASSWORD:-}" ] || { echo "POSTGRES_PASSWORD is not set" >&2; exit 1; }
    printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pw
    # UTF8: psycopg hands back bytes, not text, from an SQL_ASCII database.
    "$bin/initdb" -D "$PGDATA" -U "$user" --pwfile=/tmp/pw --auth-local=trust \
        --encoding=UTF8 --locale=C.UTF-8 \
        --auth-host=scram-sha-256 >/dev/null
    rm -f /tmp/pw
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
        "$bin/createdb" -U "$user" "$db"
        "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    fi
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*'
SH
    cat > "$work/postgres/Containerfile" <<DOCKERFILE
FROM $BASE
RUN $NO_SERVICES && apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data
COPY entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PGDATA=/var/lib/postgresql/data
USER postgres
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/bin/sh", "/usr/local/bin/postgres-entrypoint"]
DOCKERFILE
    build --network host -t "$POSTGRES:$recipe" "$work/postgres"
fi
retag "$POSTGRES" "$recipe" 15

if ! have "$ORTHANC:$recipe"; then
    say "building $ORTHANC:$recipe"
    mkdir -p "$work/orthanc"
    # Debian's Orthanc reads every .json in /etc/orthanc. The compose file mounts its
    # orthanc.json there, which holds only what the orthancteam/orthanc image takes as
    # well; that image loads its plugins itself, here plugins.json does (in place of
    # Debian's orthanc.json, which would define them twice).
    cat > "$work/orthanc/Containerfile" <<DOCKERFILE
FROM $BASE
RUN $NO_SERVICES && apt-get update \
    && apt-get install -y --no-install-recommends orthanc orthanc-gdcm \
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
    && mkdir -p /var/lib/orthanc/db && chown orthanc:orthanc /var/lib/orthanc/db \
    && rm /etc/orthanc/orthanc.json \
    && echo '{ "Plugins" : [ "/usr/share/orthanc/plugins" ] }' > /etc/orthanc/plugins.json
USER orthanc
VOLUME ["/var/lib/orthanc/db"]
EXPOSE 4242 8042
ENTRYPOINT ["/usr/sbin/Orthanc"]
CMD ["/etc/orthanc/"]
DOCKERFILE
    build --network host -t "$ORTHANC:$recipe" "$work/orthanc"
fi
retag "$ORTHANC" "$recipe" 1.10

# pip inside the build uses this host's pip settings (`pip config list`: a proxy's CA
# certificate, local wheel folders, constraints), each file or folder they name mounted
# read-only at the same path for the build only: nothing of it lands in the image.
pip_mounts=""
if python3 -m pip --version >/dev/null 2>&1; then
    python3 - "$work/pip.conf" > "$work/pip-paths" <<'PY'
import os, re, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                     capture_output=True, text=True).stdout
settings = {}
for line in out.splitlines():
    m = re.match(r"(global|:env:)\.([\w-]+)='(.*)'$", line)
    if m and m.group(2) not in ("default-timeout", "disable-pip-version-check"):
        settings[m.group(2)] = m.group(3)
paths = set()
for value in settings.values():
    for token in value.split():
        path = token.removeprefix("file://")
        if path.startswith("/") and os.path.exists(path):
            if os.path.isdir(path):  # a file:// index's pages link to files beside it
                path = os.path.realpath(path)
                path = os.path.dirname(path) if os.path.basename(path) == "simple" else path
            paths.add(path)
with open(sys.argv[1], "w") as fh:
    fh.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
print("\n".join(sorted(paths)))
PY
    pip_mounts="-v $work/pip.conf:/etc/pip.conf:ro"
    while read -r path; do
        [ -n "$path" ] && pip_mounts="$pip_mounts -v $path:$path:ro"
    done < "$work/pip-paths"
fi

# The compacs image: tagged by a hash of what deploy/Dockerfile copies.
hash=$(find pyproject.toml README.md deploy/Dockerfile service codecs models -type f \
        ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort | xargs sha256sum \
        | sha256sum | cut -c1-16)
if ! have "$COMPACS:src-$hash"; then
    say "building $COMPACS:src-$hash"
    # --format docker keeps the HEALTHCHECK (the OCI image format has no place for it).
    # shellcheck disable=SC2086 # one word per mount option
    build --network host --format docker --build-arg "BASE=$BASE" $pip_mounts \
        -f deploy/Dockerfile -t "$COMPACS:src-$hash" .
fi
retag "$COMPACS" "src-$hash" local
say "ready: $BASE, $POSTGRES:15, $ORTHANC:1.10, $COMPACS:local ($recipe, src-$hash)"
