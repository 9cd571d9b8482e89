/* bench/wake_gap.py's C side: N one-byte round trips over loopback TCP to `hops` echo
   processes in turn, each round after `gap_ms` of sleep; prints the p50 and p90 in us. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
int main(int argc,char**argv){
  int n=atoi(argv[1]); double gap=atof(argv[2]); int hops=argc>3?atoi(argv[3]):1;
  /* a chain of `hops` echo processes: a -> p1 -> p2 ... -> back */
  int one=1;
  int ls=socket(AF_INET,SOCK_STREAM,0); struct sockaddr_in a={0}; a.sin_family=AF_INET; a.sin_addr.s_addr=htonl(0x7f000001);
  bind(ls,(void*)&a,sizeof a); listen(ls,16); socklen_t al=sizeof a; getsockname(ls,(void*)&a,&al);
  for(int h=0;h<hops;h++){ if(fork()==0){ int c=accept(ls,0,0); setsockopt(c,IPPROTO_TCP,TCP_NODELAY,&one,4); char b; while(read(c,&b,1)==1) write(c,&b,1); _exit(0);} }
  int s[64]; for(int h=0;h<hops;h++){ s[h]=socket(AF_INET,SOCK_STREAM,0); connect(s[h],(void*)&a,sizeof a); setsockopt(s[h],IPPROTO_TCP,TCP_NODELAY,&one,4);}
  double *r=malloc(sizeof(double)*n); char b='x';
  for(int i=0;i<n;i++){ if(gap>0) usleep((useconds_t)(gap*1000)); double t=now();
    for(int h=0;h<hops;h++){ write(s[h],&b,1); read(s[h],&b,1);} r[i]=now()-t; }
  qsort(r,n,sizeof(double),cmp); printf("C hops=%d gap=%gms: p50 %.1f us, p90 %.1f us\n",hops,gap,r[n/2],r[n*9/10]);
  for(int h=0;h<hops;h++) close(s[h]); while(wait(0)>0); return 0; }
