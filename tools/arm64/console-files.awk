# The files a `smoke.sh --run` command left in $PINION_RESULT_DIR, out of the VM's console:
# smoke-init.sh prints each between "pinion-smoke: file NAME follows" and
# "pinion-smoke: end of file NAME". Written to dir/NAME (awk -v dir=DIR -f this console.txt);
# a name with anything but letters, digits, '.', '_' or '-' is not taken.
/^pinion-smoke: end of file / { out = ""; next }
out != "" { print > out; next }
/^pinion-smoke: file [A-Za-z0-9._-]+ follows$/ { out = dir "/" $3 }
