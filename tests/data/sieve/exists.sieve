require "fileinto";
if exists ["list-id","precedence"] { fileinto "Lists"; } elsif exists "x-priority" { fileinto "Prio"; }
