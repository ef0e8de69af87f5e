# Shared by the launch scripts (sourced): print a command the way a shell would read it back.

# One word, readably quoted: bare when it has no shell-special characters, else in single
# quotes (an embedded ' becomes '\'').
quote_word() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    local escaped="${1//\'/\'\\\'\'}"
    printf "'%s'" "$escaped"
  fi
}

# `print_command CMD ARG...` -> "+ CMD ARG..." on stdout, pasteable into a shell.
print_command() {
  local line="+" word
  for word in "$@"; do line+=" $(quote_word "$word")"; done
  printf '%s\n' "$line"
}
