require "encoded-character";
keep;
fileinto "${unicode:D800}";
