# Helpers shared by the scripts that fetch and run what the tests need on loopback
# (scripts/kafka, scripts/registry, scripts/cassandra). Sourced, not run.

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# The cache every fetched artifact lives in, one folder per artifact and version.
herald_cache() { echo "${HERALD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/herald}"; }

# A java binary of at least major version $1: JAVA_HOME, then `java` on the PATH, then the JDKs
# under /usr/lib/jvm (newest first).
java_at_least() {
  local want="$1" candidates=() c
  [ -n "${JAVA_HOME:-}" ] && candidates+=("$JAVA_HOME/bin/java")
  command -v java >/dev/null && candidates+=("$(command -v java)")
  for c in $(ls -d /usr/lib/jvm/*/ 2>/dev/null | sort -rV); do candidates+=("${c}bin/java"); done
  for c in "${candidates[@]}"; do
    [ -x "$c" ] || continue
    local major
    major="$("$c" -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/ {print $2}')"
    major="${major%%.*}"
    if [ -n "$major" ] && [ "$major" -ge "$want" ] 2>/dev/null; then
      echo "$c"
      return 0
    fi
  done
  die "Java $want or newer is needed (set JAVA_HOME); none found on the PATH or under /usr/lib/jvm"
}

# Resolves Maven artifacts into a folder once: $1 the folder, $2 the dependencies' XML, $3 what
# Maven runs (copy-dependencies or a copy of one artifact). The folder appears whole or not at all.
maven_fetch() {
  local out="$1" deps="$2" goal="$3" name="$4"
  [ -f "$out/.complete" ] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch $name"
  local work="$out.maven"
  rm -rf "$work" "$out.tmp"
  mkdir -p "$work"
  cat >"$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>herald.tests</groupId>
  <artifactId>fetch</artifactId>
  <version>1</version>
  <dependencies>
$deps
  </dependencies>
</project>
POM
  echo "$(basename "$0"): fetching $name through Maven (once per machine)" >&2
  (cd "$work" && mvn -q -B $goal -DoutputDirectory="$out.tmp") >&2 ||
    die "Maven could not resolve $name"
  rm -rf "$out"
  mv "$out.tmp" "$out"
  rm -rf "$work"
  touch "$out/.complete"
}

# $1 free loopback TCP ports, space-separated.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Whether a process runs: a killed process whose parent is gone may stay a zombie until it is
# reaped, and a zombie still answers `kill -0`.
alive() {
  local state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [ -n "$state" ] && [ "$state" != Z ]
}

# A CA and a server certificate for 127.0.0.1/localhost in $1: ca.pem, server.pem, server.key.
make_server_cert() {
  local dir="$1"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=Herald test CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 30 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
}

# Stops the service in $1 (by running `$3 stop --dir $1`) once process $2 is gone, so a test
# binary that dies leaks nothing. $4 is the file whose presence means "still started".
watch_owner() {
  local dir="$1" owner="$2" script="$3" marker="$4"
  setsid nohup bash -c '
    dir="$1"; owner="$2"; marker="$4"
    while [ "$(awk "{print \$3}" "/proc/$owner/stat" 2>/dev/null || echo Z)" != Z ] && [ -f "$marker" ]; do sleep 1; done
    [ -f "$marker" ] && exec "$3" stop --dir "$dir"
  ' watchdog "$dir" "$owner" "$script" "$marker" >/dev/null 2>&1 </dev/null &
}

# SIGTERM the pids, SIGKILL whatever still runs after $1 seconds.
stop_pids_within() {
  local grace="$1"
  shift
  local p
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  local deadline=$((SECONDS + grace))
  while [ $SECONDS -lt $deadline ]; do
    local running=0
    for p in "$@"; do alive "$p" && running=1; done
    [ "$running" = 0 ] && return 0
    sleep 0.2
  done
  for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; done
}
